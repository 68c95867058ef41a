"""One replica of a deployment on this machine: a runtime process and its sidecar Envoy.

Lifecycle: starting -> ready (registered in etcd under a lease) -> draining -> stopped, or crashed when either
process dies. Each change is also reported as the replica's status (``replicas/``, crashed being "crash-looping"
with the error and the time of the next start), from its first start until it is stopped. Only the
ProcessDeployer drives it, from one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Generic, Literal, Protocol, TypeVar

from manager_api.deployer.backoff import Backoff
from manager_api.ports import free_port
from manager_api.processes import ChildProcess, ProcessExited, ReadinessTimeout, http_ok
from protos.topology.instances import Instance, PipelineInstance
from protos.topology.policies import BatchingPolicy
from protos.topology.records import now_iso
from protos.topology.replicas import LAST_ERROR_MAX_CHARS, PipelineReplicaStatus, ReplicaStatus
from protos.topology.replicas import ReplicaState as ReportedState
from xds_control.bootstrap import envoy_process, envoy_ready, render_bootstrap
from xds_control.resources.request_limits import DEFAULT_MAX_REQUEST_BYTES

log = logging.getLogger(__name__)

ReplicaState = Literal["starting", "ready", "draining", "crashed", "stopped"]

#: What a replica's status says in each state: a crashed replica waits to start again; a stopped one is on its way
#: out (its status is removed right after).
REPORTED: dict[ReplicaState, ReportedState] = {
    "starting": "starting",
    "ready": "ready",
    "draining": "draining",
    "crashed": "crash-looping",
    "stopped": "draining",
}


#: Lines of a dead process's log kept in its replica's ``last_error``.
LOG_TAIL_LINES = 20


class InstanceRegistry(Protocol):
    """Where ready instances and every replica's status are announced (etcd, under the node's lease)."""

    async def register_instance(self, instance: Instance | PipelineInstance) -> None: ...

    async def deregister_instance(self, instance: Instance | PipelineInstance) -> None: ...

    async def report_status(self, status: ReplicaStatus | PipelineReplicaStatus) -> None: ...

    async def clear_status(self, status: ReplicaStatus | PipelineReplicaStatus) -> None: ...


@dataclass(frozen=True, kw_only=True)
class PairConfig:
    """What every runtime + sidecar pair needs to start (model replicas and pipeline replicas), fixed for its life."""

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
    #: The runtime's largest message: at least the mesh's request limit, which the ingress enforces first.
    max_message_mb: int = DEFAULT_MAX_REQUEST_BYTES // 2**20


@dataclass(frozen=True, kw_only=True)
class ReplicaConfig(PairConfig):
    """Everything a model replica needs to start, fixed for its lifetime."""

    model: str
    version: int
    model_dir: Path
    batching: BatchingPolicy | None = None
    #: The registered folder digest the runtime must find before loading; None (older records): not checked.
    expect_digest: str | None = None
    #: The registered manifest (path -> sha256), so that a mismatch names the file; optional.
    expected_files: Mapping[str, str] | None = None


def _batching_flags(batching: BatchingPolicy | None) -> list[str]:
    """The runtime's command-line flags for a deployment's batching policy (none when batching is off)."""
    if batching is None:
        return []
    return ["--max-batch-size", str(batching.max_batch_size), "--max-batch-delay-ms", str(batching.max_delay_ms)]


def _digest_flags(config: ReplicaConfig, workdir: Path) -> list[str]:
    """``--expect-digest`` (and the manifest, written beside the logs) when the model version has a digest."""
    if config.expect_digest is None:
        return []
    flags = ["--expect-digest", config.expect_digest]
    if config.expected_files is not None:
        manifest = workdir / "expected-files.json"
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps(dict(config.expected_files), sort_keys=True))
        flags += ["--expect-files", str(manifest)]
    return flags


def exit_text(returncode: int | None) -> str:
    """``exited with code 1``, ``killed by SIGKILL``: how a process ended, in words."""
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


def bounded(text: str, limit: int = LAST_ERROR_MAX_CHARS) -> str:
    """``text`` within ``limit`` characters: its first line (the exit status) and as much of its end as fits."""
    if len(text) <= limit:
        return text
    head, _, _ = text.partition("\n")
    head = head[: limit // 4]
    marker = "\n[...]\n"
    return head + marker + text[-(limit - len(head) - len(marker)) :]


def crash_report(processes: list[ChildProcess]) -> str:
    """How each of ``processes`` ended and the last lines of its log, bounded for ``ReplicaStatus.last_error``."""
    parts = [f"{p.name} {exit_text(p.returncode)}{p.log_tail(LOG_TAIL_LINES)}" for p in processes]
    return bounded("\n".join(parts))


ConfigT = TypeVar("ConfigT", bound=PairConfig)


class ProcessPair(Generic[ConfigT]):
    """A runtime + sidecar pair; restartable after a crash with new processes (same instance id).

    Subclasses say which processes to run (``_spawn``), what to register once ready (``instance``) and how to
    report their status (``_status_record``); the lifecycle is the same for model and pipeline replicas.
    """

    #: Start the runtime only once the sidecar is ready (all its listeners bound), not both at once.
    sidecar_first = False

    def __init__(self, config: ConfigT, registry: InstanceRegistry) -> None:
        self.config = config
        self.registry = registry
        self.id = f"{config.node}-{uuid.uuid4().hex[:8]}"
        self.state: ReplicaState = "starting"
        self.last_error: str | None = None
        self.restarts = 0
        #: Grows with each crash; a crash after BACKOFF_RESET_SECONDS of being ready starts it over.
        self._backoff = Backoff()
        self.crashed_at = 0.0
        #: When the pair last became ready (monotonic); 0 while it is not.
        self.ready_since = 0.0
        #: Set by stop(): from then on no start, crash or readiness may announce anything.
        self.retired = False
        self.status: ReplicaStatus | PipelineReplicaStatus | None = None
        self.runtime: ChildProcess | None = None
        self.sidecar: ChildProcess | None = None
        self.inbound_port = 0
        self.grpc_port = 0
        self.http_port = 0
        #: The sidecar's admin port (loopback), for tests and benchmarks that read its stats.
        self.admin_port = 0

    @property
    def instance(self) -> Instance | PipelineInstance:
        """The record registered while the pair is ready."""
        raise NotImplementedError

    @property
    def served(self) -> str:
        """What the pair serves, for logs: ``iris:1``."""
        raise NotImplementedError

    def _spawn(self, workdir: Path, admin_port: int) -> tuple[ChildProcess, ChildProcess]:
        """The runtime and the sidecar (not started) on this pair's ports."""
        raise NotImplementedError

    def _status_record(
        self, state: ReportedState, since: str, next_restart_at: str | None
    ) -> ReplicaStatus | PipelineReplicaStatus:
        raise NotImplementedError

    async def _report(self, next_restart_at: str | None = None) -> None:
        """Write the replica's status; a failure is logged, never fatal (the status is for people, not traffic)."""
        state = REPORTED[self.state]
        previous = self.status
        since = previous.since if previous is not None and previous.state == state else now_iso()
        self.status = self._status_record(state, since, next_restart_at)
        try:
            await self.registry.report_status(self.status)
        except Exception as exc:
            log.warning("could not report the status of replica %s: %s", self.id, exc)

    def alive(self) -> bool:
        return all(p is not None and p.running for p in (self.runtime, self.sidecar))

    async def start(self) -> None:
        """Start both processes, wait until the runtime answers ready through the sidecar, then register."""
        self.state = "starting"
        cfg = self.config
        host = cfg.host
        self.grpc_port, self.http_port = free_port(host), free_port(host)
        self.inbound_port, self.admin_port = free_port(cfg.advertise_address), free_port(host)
        admin_port = self.admin_port
        workdir = cfg.workdir / self.id
        await self._report()
        if self.retired:
            # stop() ran during the report: it found no processes to kill, so none may be started.
            return
        # Through the sidecar at the advertised address: ready means reachable the way the ingress will call it.
        ready_url = f"http://{cfg.advertise_address}:{self.inbound_port}/v2/health/ready"
        started = time.monotonic()
        # The processes of a previous attempt are gone: only this attempt's may be stopped on a failure below.
        self.runtime = self.sidecar = None
        try:
            self.runtime, self.sidecar = self._spawn(workdir, admin_port)
            if not self.sidecar_first:
                self.runtime.start()
            self.sidecar.start()
            for process, check in (
                (self.sidecar, lambda: envoy_ready(admin_port)),
                (self.runtime, lambda: http_ok(ready_url)),
            ):
                if process is self.runtime and self.sidecar_first:
                    process.start()
                remaining = max(1.0, cfg.ready_timeout - (time.monotonic() - started))
                await asyncio.to_thread(process.wait_ready, check, remaining)
        except ReadinessTimeout as exc:
            if isinstance(exc, ProcessExited):
                # Started and exited: a runtime still waiting for its sidecar (sidecar_first) is not to blame.
                dead = [p for p in (self.runtime, self.sidecar) if p is not None and p.returncode is not None]
                self.last_error = crash_report(dead)
            else:
                self.last_error = bounded(str(exc))
            await self._kill()
            await self._crashed()
            raise
        except Exception as exc:
            # A process that cannot even be spawned (a missing or unusable binary, no room for its log): a crash
            # like any other, restarted with back-off, and the process that did start is not left running alone.
            await self._fail_start(f"cannot start {self.served}: {type(exc).__name__}: {exc}")
            raise
        if self.retired:
            # Stopped while starting: announce nothing, and make sure the processes are gone (stop() may have run
            # before they existed).
            await self._kill()
            return
        self.state = "ready"
        self.ready_since = time.monotonic()
        try:
            await self.registry.register_instance(self.instance)
        except Exception as exc:
            # Ready but not announced would never get traffic, nor ever be retried: start again later instead.
            with contextlib.suppress(Exception):
                await self.registry.deregister_instance(self.instance)
            await self._fail_start(f"{self.served} ready but not registered: {type(exc).__name__}: {exc}")
            raise
        await self._report()
        where = f"{cfg.advertise_address}:{self.inbound_port}"
        log.info("replica %s of %s ready on %s", self.id, self.served, where)

    async def _fail_start(self, reason: str) -> None:
        """A start that failed outside the processes: say why, stop whatever runs, wait to start again."""
        self.last_error = bounded(reason)
        log.warning("replica %s: %s", self.id, self.last_error)
        await self._kill()
        await self._crashed()

    async def stop(self, drain: bool = True) -> None:
        """Deregister, let in-flight requests finish while proxies drop the endpoint, then stop both processes."""
        was_ready = self.state == "ready"
        self.retired = True
        self.state = "draining"
        await self._report()
        with contextlib.suppress(Exception):
            await self.registry.deregister_instance(self.instance)
        if drain and was_ready and self.config.drain_seconds > 0:
            # Proxies need a push to stop sending here; this is the drain window, not a readiness wait.
            await asyncio.sleep(self.config.drain_seconds)
        await self._kill()
        self.state = "stopped"
        if self.status is not None:
            with contextlib.suppress(Exception):
                await self.registry.clear_status(self.status)

    async def handle_crash(self) -> None:
        """One of the processes died: deregister at once and stop the survivor."""
        dead = [p for p in (self.runtime, self.sidecar) if p is not None and p.returncode is not None]
        self.last_error = crash_report(dead)
        log.warning("replica %s crashed: %s", self.id, self.last_error)
        with contextlib.suppress(Exception):
            await self.registry.deregister_instance(self.instance)
        await self._kill()
        await self._crashed()

    async def _crashed(self) -> None:
        if self.retired:
            return
        self.state = "crashed"
        self.crashed_at = time.monotonic()
        # A pair that served long enough starts a new run of crashes, not the next step of an old one.
        self._backoff.failed(self.crashed_at - self.ready_since if self.ready_since else 0.0)
        self.ready_since = 0.0
        restart_at = datetime.now(UTC) + timedelta(seconds=self.restart_delay())
        await self._report(next_restart_at=restart_at.isoformat(timespec="milliseconds"))

    def restart_delay(self) -> float:
        """Back-off before the next start: 0.5 s doubling to 30 s with each crash since the pair last stayed ready
        for BACKOFF_RESET_SECONDS (backoff.py)."""
        return self._backoff.delay()

    async def _kill(self) -> None:
        for process in (self.runtime, self.sidecar):
            if process is not None:
                await asyncio.to_thread(process.stop, 5.0)


class Replica(ProcessPair[ReplicaConfig]):
    """One replica of a model version's deployment: ``python -m runtimes`` and its sidecar."""

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

    @property
    def served(self) -> str:
        return f"{self.config.model}:{self.config.version}"

    def _status_record(self, state: ReportedState, since: str, next_restart_at: str | None) -> ReplicaStatus:
        return ReplicaStatus(
            model=self.config.model,
            version=self.config.version,
            id=self.id,
            node=self.config.node,
            state=state,
            address=self.config.advertise_address,
            port=self.inbound_port,
            restarts=self.restarts,
            since=since,
            last_error=self.last_error,
            next_restart_at=next_restart_at,
        )

    def _spawn(self, workdir: Path, admin_port: int) -> tuple[ChildProcess, ChildProcess]:
        cfg = self.config
        runtime = ChildProcess(
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
                cfg.host,
                "--grpc-port",
                str(self.grpc_port),
                "--http-port",
                str(self.http_port),
                "--max-message-mb",
                str(cfg.max_message_mb),
                *_batching_flags(cfg.batching),
                *_digest_flags(cfg, workdir),
            ],
            log_path=workdir / "runtime.log",
        )
        bootstrap = render_bootstrap(
            "sidecar",
            node_id=f"sidecar~{cfg.model}~{cfg.version}~{self.id}",
            model=cfg.model,
            version=cfg.version,
            instance=self.id,
            inbound_address=cfg.advertise_address,
            inbound_port=self.inbound_port,
            runtime_address=cfg.host,
            runtime_grpc_port=self.grpc_port,
            runtime_http_port=self.http_port,
            admin_port=admin_port,
            xds_host=cfg.xds_host,
            xds_port=cfg.xds_port,
            ads_api_type=cfg.ads_api_type,
        )
        return runtime, envoy_process("sidecar", bootstrap, workdir, admin_port)
