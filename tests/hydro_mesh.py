"""A whole `hydro up` stack for tests: starting and stopping it, its URLs, the manager client, the iris rows.

Used by tests/e2e (one stack per module) and by the runtime conformance tests that go through the ingress.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
from sklearn.datasets import load_iris

from manager_api.client import ManagerClient
from manager_api.credentials import load_credentials
from manager_api.ports import free_port
from manager_api.processes import ChildProcess, http_ok

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "iris"
ROWS = load_iris().data[[0, 50, 100, 120]]
#: The classes of ROWS.
EXPECTED = [0, 1, 2, 2]


class Mesh:
    def __init__(
        self, process: ChildProcess, ingress_port: int, api_port: int, xds_port: int, token: str, data_dir: Path
    ) -> None:
        self.process = process
        self.data_dir = data_dir
        #: pgrep pattern of this stack's xds_control (other stacks may run beside it).
        self.xds_pattern = rf"[-]m xds_control .*--port {xds_port} "
        self.ingress = f"http://127.0.0.1:{ingress_port}"
        self.grpc_target = f"127.0.0.1:{ingress_port}"
        self.api = ManagerClient(f"http://127.0.0.1:{api_port}", token)

    def runtime_pids(self, model: str, version: int) -> list[int]:
        """Runtime processes of this stack (its artifacts folder is in their command line) for one version."""
        pattern = rf"[-]m runtimes --model-dir {self.data_dir}/\S* --name {model} --version {version} "
        found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        return [int(pid) for pid in found]

    def infer(self, app: str = "iris", timeout: float = 10.0) -> httpx.Response:
        body = {"inputs": [{"name": "input", "shape": list(ROWS.shape), "datatype": "FP64", "data": ROWS.tolist()}]}
        return httpx.post(f"{self.ingress}/v2/models/{app}/infer", json=body, timeout=timeout)


def descendants(root: int) -> set[int]:
    found = {root}
    changed = True
    while changed:
        changed = False
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if parent in found and int(entry.name) not in found:
                found.add(int(entry.name))
                changed = True
    return found


@contextmanager
def running_mesh(
    data_dir: Path, xds_api: str = "sotw", extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None
) -> Iterator[Mesh]:
    """`hydro up` on free ports, ready (the ingress answers); stopped with SIGTERM on exit, and nothing it started
    may outlive it (survivors are killed and fail the caller). ``extra_args`` go to `hydro up`, ``env`` replaces
    the environment it inherits."""
    ports = {name: free_port() for name in ("ingress", "api", "xds", "metrics", "etcd")}
    argv = [sys.executable, "-m", "manager_api.cli", "up", "--data-dir", str(data_dir), "--xds-api", xds_api]
    argv += extra_args
    for name, option in (
        ("ingress", "--ingress-port"),
        ("api", "--api-port"),
        ("xds", "--xds-port"),
        ("etcd", "--etcd-port"),
        ("metrics", "--xds-metrics-port"),
    ):
        argv += [option, str(ports[name])]
    process = ChildProcess(
        "hydro-up",
        argv,
        env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"},
        log_path=data_dir / "hydro-up.log",
    ).start()
    mesh: Mesh | None = None
    try:
        process.wait_ready(lambda: http_ok(f"http://127.0.0.1:{ports['ingress']}/v2/health/ready"), 90)
        credentials = load_credentials(data_dir)
        assert credentials is not None, "hydro up wrote no credentials"
        mesh = Mesh(process, ports["ingress"], ports["api"], ports["xds"], credentials.token, data_dir)
        yield mesh
    finally:
        if mesh is not None:
            mesh.api.close()
        family = descendants(process.pid or 0)
        process.stop(grace=60)
        print(process.log_tail(80))
        survivors = [pid for pid in family if Path(f"/proc/{pid}").exists() and pid != os.getpid()]
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
        assert not survivors, f"hydro up left processes behind: {survivors}"
