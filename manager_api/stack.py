"""`hydro up`: the embedded stack on one machine, supervised, with nothing left behind on exit.

Starts etcd, xds_control, manager_api (with the process deployer) and the ingress Envoy, each in its own
process group and killed by the kernel if this process dies. A child that exits is restarted with back-off.
SIGINT or SIGTERM stops them in reverse order; the manager drains and stops the runtimes and sidecars it runs.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from manager_api.client import ManagerClient
from manager_api.credentials import ensure_admin_credentials
from manager_api.etcd_server import EtcdServer
from manager_api.model_discovery import ModelDiscovery
from manager_api.ports import free_port, reserve, reserved_environment
from manager_api.processes import ChildProcess, http_ok
from manager_api.supervisor import Supervisor
from tracing.settings import parse_endpoint
from xds_control.bootstrap import envoy_ready, ingress_envoy


@dataclass(frozen=True)
class StackConfig:
    """Ports and places of the embedded stack; 0 means "pick a free port"."""

    data_dir: Path
    host: str = "127.0.0.1"
    #: Where etcd, xds_control and the manager API listen: loopback unless agents on other hosts must reach them.
    control_host: str = "127.0.0.1"
    #: Whether the manager runs replicas here as node "local"; False leaves them all to `hydro agent`s.
    local_node: bool = True
    ingress_port: int = 8080
    api_port: int = 8081
    xds_port: int = 18000
    #: ADS flavour every Envoy speaks: "sotw" (state of the world) or "delta".
    xds_api: str = "sotw"
    xds_metrics_port: int = 18001
    etcd_port: int = 2379
    prefix: str = "/hydro/"
    ready_timeout: float = 60.0
    #: Folder of model folders to register and keep up to date (manager_api.model_discovery); None: off.
    models_dir: Path | None = None
    #: OTLP gRPC collector (HOST:PORT or http://HOST:PORT) every process and Envoy sends spans to; None: tracing
    #: as the OTEL_* variables of this process say (off without an endpoint).
    otlp_endpoint: str | None = None
    #: Share of requests the ingress traces; sidecars and runtimes follow its decision.
    trace_sampling_percent: float = 100.0
    #: The manager's --artifact-store (s3://BUCKET/PREFIX or a directory); None keeps archives in data_dir.
    artifact_store: str | None = None
    s3_endpoint: str | None = None
    #: The manager's --allow-register-from folders (registration by server path); empty: off.
    register_roots: tuple[Path, ...] = ()


class Stack:
    """The supervised processes of `hydro up`."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.data_dir = config.data_dir.resolve()
        self.logs = self.data_dir / "logs"
        # Ports named on the command line, before any pick: the ingress's is bound only once its listener arrives
        # (LDS), and etcd's peer port or Envoy's admin port, picked meanwhile, must not take it.
        reserve(config.ingress_port, config.api_port, config.xds_port, config.xds_metrics_port, config.etcd_port)
        self.ingress_port = config.ingress_port or free_port(config.host)
        control = config.control_host
        self.api_port = config.api_port or free_port(control)
        self.xds_port = config.xds_port or free_port(control)
        self.xds_metrics_port = config.xds_metrics_port or free_port()
        self.etcd = EtcdServer(self.data_dir, config.etcd_port or free_port(control), host=control)
        # Picked now, not when the ingress starts: then it is among the ports the children are told of (below).
        self.ingress_admin_port = free_port()
        self.credentials, self.tokens_file = ensure_admin_credentials(self.data_dir, self.api_url)
        self.supervisor = Supervisor()
        self._discovery: ModelDiscovery | None = None
        #: The children's environment: with --otlp-endpoint, every process (and through the manager, every
        #: runtime it starts) exports its spans there.
        self.env = dict(os.environ)
        if config.otlp_endpoint is not None:
            self.env["OTEL_EXPORTER_OTLP_ENDPOINT"] = parse_endpoint(config.otlp_endpoint).url
        # reserve() above holds in this process only; the manager's deployer, in its own process, picks ports for
        # runtimes and sidecars from the same window (--ingress-port 0, or a port given there) while the ingress's
        # is still unbound (until its LDS, again after each restart): told of them, it never picks them.
        reserved_environment(self.env, self._ports())

    def _ports(self) -> list[int]:
        """Every port this stack's servers listen on, some of them bound only later (the ingress's listener)."""
        etcd = (self.etcd.client_port, self.etcd.peer_port)
        return [self.ingress_port, self.api_port, self.xds_port, self.xds_metrics_port, *etcd, self.ingress_admin_port]

    @property
    def ingress_url(self) -> str:
        return f"http://{self._client_host}:{self.ingress_port}"

    @property
    def api_url(self) -> str:
        return f"http://{_reachable(self.config.control_host)}:{self.api_port}"

    @property
    def xds_address(self) -> str:
        return f"{_reachable(self.config.control_host)}:{self.xds_port}"

    @property
    def _client_host(self) -> str:
        return _reachable(self.config.host)

    def start(self) -> None:
        """Start every process in dependency order, each one ready before the next starts."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Supervised before it is started, like every child (see _run): stop() stops it even if it never got ready.
        self.supervisor.add(self.etcd.process)
        self.etcd.start(self.config.ready_timeout)
        python = sys.executable
        xds = ChildProcess(
            "xds_control",
            [
                python,
                "-m",
                "xds_control",
                "--etcd",
                self.etcd.endpoint,
                "--prefix",
                self.config.prefix,
                "--host",
                self.config.control_host,
                "--port",
                str(self.xds_port),
                "--metrics-port",
                str(self.xds_metrics_port),
                "--trace-sampling-percent",
                str(self.config.trace_sampling_percent),
            ],
            env=self.env,
            log_path=self.logs / "xds_control.log",
        )
        self._run(xds, lambda: _tcp_open(_reachable(self.config.control_host), self.xds_port))
        manager = ChildProcess(
            "manager_api",
            [
                python,
                "-m",
                "manager_api",
                "--etcd",
                self.etcd.endpoint,
                "--prefix",
                self.config.prefix,
                "--data-dir",
                str(self.data_dir),
                "--host",
                self.config.control_host,
                "--port",
                str(self.api_port),
                "--deployer",
                "process" if self.config.local_node else "none",
                "--xds",
                self.xds_address,
                # The local node's sidecars are reached where the rest of the control plane is.
                "--advertise-address",
                _reachable(self.config.control_host),
                "--xds-api",
                self.config.xds_api,
                "--tokens",
                str(self.tokens_file),
                *_artifact_store_args(self.config),
                *(arg for root in self.config.register_roots for arg in ("--allow-register-from", str(root))),
            ],
            env=self.env,
            log_path=self.logs / "manager_api.log",
        )
        self._run(manager, lambda: http_ok(f"{self.api_url}/healthz"))
        admin_port = self.ingress_admin_port
        ingress = ingress_envoy(
            self.logs,
            admin_port=admin_port,
            xds_port=self.xds_port,
            listen_port=self.ingress_port,
            listen_address=self.config.host,
            xds_host=_reachable(self.config.control_host),
            ads_api_type="DELTA_GRPC" if self.config.xds_api == "delta" else "GRPC",
        )
        self._run(ingress, lambda: envoy_ready(admin_port))
        if self.config.models_dir is not None:
            api = ManagerClient(self.api_url, self.credentials.token)
            self._discovery = ModelDiscovery(self.config.models_dir.resolve(), api).start()

    def _run(self, process: ChildProcess, ready: Callable[[], bool]) -> None:
        # In the books first: a child that does not get ready in time still runs, and stop() must stop it.
        self.supervisor.add(process)
        process.start()
        process.wait_ready(ready, self.config.ready_timeout)

    def supervise(self) -> None:
        """Restart children that exit (supervisor.py) until stop() is called."""
        self.supervisor.run()

    def stop(self) -> None:
        """Stop every child in reverse start order (the manager drains its runtimes first)."""
        if self._discovery is not None:
            self._discovery.stop()
            self._discovery.api.close()
        self.supervisor.stop(grace=lambda process: 30.0 if process.name == "manager_api" else 10.0)


def _artifact_store_args(config: StackConfig) -> list[str]:
    args = [] if config.artifact_store is None else ["--artifact-store", config.artifact_store]
    return args + ([] if config.s3_endpoint is None else ["--s3-endpoint", config.s3_endpoint])


def _reachable(host: str) -> str:
    """The address a client dials for a server bound to ``host`` (the wildcard is reached on loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def _tcp_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def run_until_signalled(
    stack: Stack, after_start: Callable[[], None] | None = None, on_signal_stop: Callable[[], None] | None = None
) -> int:
    """Start the stack, run ``after_start`` (the demo), supervise until SIGINT/SIGTERM, then stop everything
    (``on_signal_stop`` is called first: stopping takes seconds, and the user who pressed Ctrl-C is told).

    A child that exits or does not get ready while the stack starts is a ReadinessTimeout (its log tail in the
    message), raised once everything started so far is stopped.
    """

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        stack.start()
        if after_start is not None:
            after_start()
        stack.supervise()
    except KeyboardInterrupt:
        if on_signal_stop is not None:
            on_signal_stop()
    finally:
        # A second signal while stopping must not abandon children half-stopped.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stack.stop()
    return 0
