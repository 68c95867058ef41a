"""One replica of a deployment on this machine: a runtime process and its sidecar Envoy.

Lifecycle: starting -> ready (registered in etcd under a lease) -> draining -> stopped, or crashed when either
process dies. Only the ProcessDeployer drives it, from one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from manager_api.processes import ChildProcess, ReadinessTimeout, free_port, http_ok
from protos.topology import BatchingPolicy, Instance
from xds_control.bootstrap import envoy_process, envoy_ready, render_bootstrap
from xds_control.resources import DEFAULT_MAX_REQUEST_BYTES

log = logging.getLogger(__name__)

ReplicaState = Literal["starting", "ready", "draining", "crashed", "stopped"]


class InstanceRegistry(Protocol):
    """Where ready instances are announced (etcd, under a lease that the registry keeps alive)."""

    async def register_instance(self, instance: Instance) -> None: ...

    async def deregister_instance(self, instance: Instance) -> None: ...


@dataclass(frozen=True)
class ReplicaConfig:
    """Everything a replica needs to start, fixed for its lifetime."""

    model: str
    version: int
    model_dir: Path
    node: str
    xds_host: str
    xds_port: int
    workdir: Path
    #: Where the runtime listens: only its sidecar, on the same host, talks to it.
    host: str = "127.0.0.1"
    #: Where the sidecar's inbound listener listens, and the address registered for other hosts to reach it.
    advertise_address: str = "127.0.0.1"
    ready_timeout: float = 60.0
    drain_seconds: float = 1.0
    ads_api_type: str = "GRPC"
    batching: BatchingPolicy | None = None
    #: The runtime's largest message: at least the mesh's request limit, which the ingress enforces first.
    max_message_mb: int = DEFAULT_MAX_REQUEST_BYTES // 2**20


def _batching_flags(batching: BatchingPolicy | None) -> list[str]:
    """The runtime's command-line flags for a deployment's batching policy (none when batching is off)."""
    if batching is None:
        return []
    return ["--max-batch-size", str(batching.max_batch_size), "--max-batch-delay-ms", str(batching.max_delay_ms)]


class Replica:
    """A runtime + sidecar pair; restartable after a crash with new processes (same instance id)."""

    def __init__(self, config: ReplicaConfig, registry: InstanceRegistry) -> None:
        self.config = config
        self.registry = registry
        self.id = f"{config.node}-{uuid.uuid4().hex[:8]}"
        self.state: ReplicaState = "starting"
        self.last_error: str | None = None
        self.restarts = 0
        self.crashed_at = 0.0
        self.runtime: ChildProcess | None = None
        self.sidecar: ChildProcess | None = None
        self.inbound_port = 0
        self.grpc_port = 0
        self.http_port = 0

    @property
    def instance(self) -> Instance:
        return Instance(
            model=self.config.model,
            version=self.config.version,
            id=self.id,
            node=self.config.node,
            address=self.config.advertise_address,
            port=self.inbound_port,
            state="ready" if self.state == "ready" else "draining",
        )

    def alive(self) -> bool:
        return all(p is not None and p.running for p in (self.runtime, self.sidecar))

    async def start(self) -> None:
        """Start both processes, wait until the runtime answers ready through the sidecar, then register."""
        self.state = "starting"
        cfg = self.config
        host = cfg.host
        self.grpc_port, self.http_port = grpc_port, http_port = free_port(host), free_port(host)
        self.inbound_port, admin_port = free_port(cfg.advertise_address), free_port(host)
        workdir = cfg.workdir / self.id
        self.runtime = ChildProcess(
            f"runtime-{self.id}",
            [
                sys.executable,
                "-m",
                "runtimes",
                "--model-dir",
                str(cfg.model_dir),
                "--name",
                cfg.model,
                "--version",
                str(cfg.version),
                "--host",
                host,
                "--grpc-port",
                str(grpc_port),
                "--http-port",
                str(http_port),
                "--max-message-mb",
                str(cfg.max_message_mb),
                *_batching_flags(cfg.batching),
            ],
            log_path=workdir / "runtime.log",
        ).start()
        bootstrap = render_bootstrap(
            "sidecar",
            node_id=f"sidecar~{cfg.model}~{cfg.version}~{self.id}",
            model=cfg.model,
            version=cfg.version,
            instance=self.id,
            inbound_address=cfg.advertise_address,
            inbound_port=self.inbound_port,
            runtime_address=host,
            runtime_grpc_port=grpc_port,
            runtime_http_port=http_port,
            admin_port=admin_port,
            xds_host=cfg.xds_host,
            xds_port=cfg.xds_port,
            ads_api_type=cfg.ads_api_type,
        )
        self.sidecar = envoy_process("sidecar", bootstrap, workdir, admin_port).start()
        # Through the sidecar at the advertised address: ready means reachable the way the ingress will call it.
        ready_url = f"http://{cfg.advertise_address}:{self.inbound_port}/v2/health/ready"
        started = time.monotonic()
        try:
            for process, check in (
                (self.sidecar, lambda: envoy_ready(admin_port)),
                (self.runtime, lambda: http_ok(ready_url)),
            ):
                remaining = max(1.0, cfg.ready_timeout - (time.monotonic() - started))
                await asyncio.to_thread(process.wait_ready, check, remaining)
        except ReadinessTimeout as exc:
            self.last_error = str(exc)
            await self._kill()
            self._mark_crashed()
            raise
        self.state = "ready"
        await self.registry.register_instance(self.instance)
        where = f"{cfg.advertise_address}:{self.inbound_port}"
        log.info("replica %s of %s:%d ready on %s", self.id, cfg.model, cfg.version, where)

    async def stop(self, drain: bool = True) -> None:
        """Deregister, let in-flight requests finish while proxies drop the endpoint, then stop both processes."""
        was_ready = self.state == "ready"
        self.state = "draining"
        with contextlib.suppress(Exception):
            await self.registry.deregister_instance(self.instance)
        if drain and was_ready and self.config.drain_seconds > 0:
            # Proxies need a push to stop sending here; this is the drain window, not a readiness wait.
            await asyncio.sleep(self.config.drain_seconds)
        await self._kill()
        self.state = "stopped"

    async def handle_crash(self) -> None:
        """One of the processes died: deregister at once and stop the survivor."""
        dead = [p for p in (self.runtime, self.sidecar) if p is not None and not p.running]
        self.last_error = "; ".join(f"{p.name} exited with {p.returncode}{p.log_tail(5)}" for p in dead)
        log.warning("replica %s crashed: %s", self.id, self.last_error)
        with contextlib.suppress(Exception):
            await self.registry.deregister_instance(self.instance)
        await self._kill()
        self._mark_crashed()

    def _mark_crashed(self) -> None:
        self.state = "crashed"
        self.crashed_at = time.monotonic()

    def restart_delay(self) -> float:
        """Back-off before the next start: 0.5 s doubling to 30 s."""
        return float(min(30.0, 0.5 * 2 ** min(self.restarts, 6)))

    async def _kill(self) -> None:
        for process in (self.runtime, self.sidecar):
            if process is not None:
                await asyncio.to_thread(process.stop, 5.0)
