"""The process deployer: runs this node's share of every deployment as local runtime + sidecar pairs.

It reconciles ``deployments/`` in etcd against the replicas it runs: starts missing ones, drains and stops
extra ones, and restarts crashed ones with back-off. Its share of each deployment comes from the live nodes
(``nodes/``, see placement.py), so the same code runs in `hydro up` (node "local") and in every `hydro agent`.
Instances are registered only once ready, under the node's lease, so a deployer that dies takes its endpoints
out of EDS, and its replicas to the other nodes, when the lease expires. Every replica's status (starting, ready,
crash-looping, draining) is reported under the same lease (replica.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from manager_api.deployer.backoff import Backoff
from manager_api.deployer.pipeline_replica import (
    PipelineReplica,
    PipelineReplicaConfig,
    members,
    spec_digest,
    write_spec,
)
from manager_api.deployer.placement import pipeline_share, share
from manager_api.deployer.replica import InstanceRegistry, ProcessPair, Replica, ReplicaConfig
from protos.contracts import version_key
from protos.topology.applications import Application
from protos.topology.deployments import Deployment
from protos.topology.instances import Instance, PipelineInstance
from protos.topology.models import Artifact, ModelVersion, Signature
from protos.topology.nodes import Node
from protos.topology.policies import BatchingPolicy
from xds_control.topology import Topology
from xds_control.translate import pipeline_timeout_ms

log = logging.getLogger(__name__)

ModelKey = tuple[str, int]


class DesiredState(Protocol):
    """What the deployer reads: deployments, the model versions they name, the live nodes, and change signals."""

    async def list_deployments(self) -> list[Deployment]: ...

    async def list_nodes(self) -> list[Node]: ...

    async def list_instances(self) -> list[Instance]: ...

    async def get_model_version(self, name: str, version: int) -> ModelVersion | None: ...

    async def list_applications(self) -> list[Application]: ...

    async def list_pipelines(self) -> list[PipelineInstance]: ...

    def watch_applications(self) -> Any:
        """An async iterator that yields whenever something under applications/ changed."""

    def watch_deployments(self) -> Any:
        """An async iterator that yields whenever something under deployments/ changed."""

    def watch_nodes(self) -> Any:
        """An async iterator that yields whenever a node joined or left."""


class ModelFolders(Protocol):
    """Where an artifact's unpacked model folder is."""

    def materialize(self, digest: str) -> Any: ...


class _Stated(Protocol):
    @property
    def state(self) -> str: ...


StatedT = TypeVar("StatedT", bound=_Stated)


def surplus(running: Sequence[StatedT], want: int, ready: int, total: int | None) -> list[StatedT]:
    """Which of this node's ``running`` replicas to stop when it should run ``want`` of them.

    Replicas that are not ready go first: stopping them costs no capacity. Ready ones go only while the mesh keeps
    ``total`` ready instances of the deployment without them (``ready`` counts them all, on every node): when a
    node joins or comes back, the replicas it takes over keep running elsewhere until its own are ready (make
    before break). A deleted deployment (``total`` None) is stopped at once.
    """
    count = len(running) - want
    if count <= 0:
        return []
    not_ready = [r for r in running if r.state != "ready"]
    ready_here = [r for r in running if r.state == "ready"]
    # The newest of each kind go first.
    doomed = not_ready[len(not_ready) - min(count, len(not_ready)) :]
    more = count - len(doomed)
    if total is not None:
        more = min(more, max(0, ready - total))
    if more > 0:
        doomed += ready_here[-more:]
    return doomed


def _deployment_what(key: ModelKey) -> str:
    """How a deployment is named in the logs, and its key in the deployer's memory of what could not start."""
    return f"deployment {key[0]}:{key[1]}"


def _pipeline_what(app: str) -> str:
    """How an application's pipeline is named in the logs and in the deployer's memory of what could not start."""
    return f"the pipeline of {app}"


@dataclass
class _CannotStart:
    """Why a deployment or pipeline failed to start, for which spec of it, and when to try it again."""

    spec: object
    reason: str
    backoff: Backoff
    retry_at: float = 0.0


class ProcessDeployer:
    """Reconciles deployments to local processes. All methods run on one event loop."""

    def __init__(
        self,
        desired: DesiredState,
        folders: ModelFolders,
        registry: InstanceRegistry,
        *,
        node: str,
        xds_host: str,
        xds_port: int,
        workdir: Any,
        advertise_address: str = "127.0.0.1",
        resync_interval: float = 0.5,
        drain_seconds: float = 1.0,
        ads_api_type: str = "GRPC",
    ) -> None:
        self._desired = desired
        self._folders = folders
        self._registry = registry
        self._node = node
        self._advertise_address = advertise_address
        self._xds = (xds_host, xds_port)
        self._workdir = workdir
        self._resync_interval = resync_interval
        self._drain_seconds = drain_seconds
        self._ads_api_type = ads_api_type
        self._batching: dict[ModelKey, BatchingPolicy | None] = {}
        self.replicas: dict[ModelKey, list[Replica]] = {}
        #: Pipeline runtimes by application, of every spec they were started with (see _reconcile_pipelines).
        self.pipelines: dict[str, list[PipelineReplica]] = {}
        self._starting: set[asyncio.Task[None]] = set()
        self._stopping: set[asyncio.Task[None]] = set()
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._held = False
        #: Each deployment or pipeline that could not start: why (logged once per reason) and when to try again.
        self._cannot_start: dict[str, _CannotStart] = {}

    async def start(self) -> None:
        """Begin reconciling in the background."""
        self._tasks = [
            asyncio.create_task(self._loop()),
            asyncio.create_task(self._watch(self._desired.watch_deployments)),
            asyncio.create_task(self._watch(self._desired.watch_nodes)),
            asyncio.create_task(self._watch(self._desired.watch_applications)),
        ]

    async def stop(self) -> None:
        """Stop reconciling, then drain and stop every replica this deployer runs."""
        for task in self._tasks + list(self._starting):
            task.cancel()
        for task in self._tasks + list(self._starting):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # Replicas already being drained are not cancelled: their stop kills the processes, and they are no
        # longer in self.replicas, so nothing else would.
        everything: list[ProcessPair[Any]] = [r for replicas in self.replicas.values() for r in replicas]
        everything += [p for pipelines in self.pipelines.values() for p in pipelines]
        await asyncio.gather(*self._stopping, *(r.stop(drain=False) for r in everything), return_exceptions=True)
        self.replicas.clear()
        self.pipelines.clear()

    def status(self, model: str, version: int) -> list[Replica]:
        return list(self.replicas.get((model, version), []))

    async def _watch(self, watch: Callable[[], Any]) -> None:
        while True:
            try:
                async for _ in watch():
                    self._wakeup.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("deployment watch failed (%s); retrying", exc)
                await asyncio.sleep(1.0)

    async def _loop(self) -> None:
        while True:
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconcile failed; retrying")
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._resync_interval)

    async def reconcile(self) -> None:
        """One pass: crashed replicas handled, missing ones started, extra ones drained."""
        deployments = await self._desired.list_deployments()
        nodes = [n.name for n in await self._desired.list_nodes()]
        if self._node not in nodes:
            # Our own lease is gone (etcd restarted, a long pause) and the registry is renewing it. Shares computed
            # without us would drain everything we run: start nothing and keep what runs (within each deployment's
            # replicas) until we count again. The others may run extra replicas meanwhile, the safe side.
            if not self._held:
                log.warning("node %s is not among the live nodes %s; holding its replicas", self._node, nodes)
            self._held = True
            counts = {key: len(replicas) for key, replicas in self.replicas.items()}
            desired = {(d.model, d.version): min(d.replicas, counts.get((d.model, d.version), 0)) for d in deployments}
        else:
            self._held = False
            desired = {
                (d.model, d.version): share(d.model, d.version, d.replicas, nodes, self._node) for d in deployments
            }
        # Replicas started from now on get the deployment's current batching policy; running ones keep theirs.
        self._batching = {(d.model, d.version): d.policies.batching for d in deployments}
        for replicas in self.replicas.values():
            for replica in replicas:
                if replica.state == "ready" and not replica.alive():
                    await replica.handle_crash()
        # Read after the crashes above are deregistered: they must not count as capacity.
        totals = {(d.model, d.version): d.replicas for d in deployments}
        ready = Counter((i.model, i.version) for i in await self._desired.list_instances() if i.state == "ready")
        for key, replicas in list(self.replicas.items()):
            running = [r for r in replicas if r.state != "stopped"]
            extra = surplus(running, desired.get(key, 0), ready[key], totals.get(key))
            if extra:
                self._stop(key, extra)
            now = time.monotonic()
            for replica in replicas:
                if replica.state == "crashed" and now - replica.crashed_at >= replica.restart_delay():
                    replica.restarts += 1
                    self._launch(replica)
        specs = {(d.model, d.version): d for d in deployments}
        for key, want in desired.items():
            have = len(self.replicas.get(key, []))
            what = _deployment_what(key)
            if have < want and self._may_try(what, specs[key]):
                # One deployment that cannot start (its archive lost, an agent's download refused) must not keep
                # every other deployment and pipeline of this node from starting: it is logged and retried.
                try:
                    await self._add_replicas(key, want - have)
                except Exception as exc:
                    self._unstartable(what, specs[key], exc)
                else:
                    self._cannot_start.pop(what, None)
        pipelines_wanted = await self._reconcile_pipelines(deployments, None if self._held else nodes)
        if not self._held:
            # While holding, shares are not known: a deployment that failed is kept with its back-off until then.
            wanted = {_deployment_what(key) for key, want in desired.items() if want > 0}
            self._forget_failures(wanted | {_pipeline_what(app) for app in pipelines_wanted})

    async def _add_replicas(self, key: ModelKey, count: int) -> None:
        """Start ``count`` more replicas of the deployment ``key``, its model folder unpacked first."""
        model = await self._desired.get_model_version(*key)
        if model is None:
            raise LookupError("it names a model version that is not registered")
        folder = await asyncio.to_thread(self._folders.materialize, model.artifact.digest)
        for _ in range(count):
            replica = Replica(self._config(key, folder, model.artifact), self._registry)
            self.replicas.setdefault(key, []).append(replica)
            self._launch(replica)

    def _forget_failures(self, wanted: set[str]) -> None:
        """Drop the back-off of everything that could not start and is no longer wanted on this node.

        A deleted (or scaled to zero, or placed elsewhere) deployment or application is gone from the books: a
        long-running agent that sees many short-lived failing deployments does not keep one entry each for ever,
        and one created again, even with the very same spec, is tried at once rather than after the old back-off.
        """
        for what in self._cannot_start.keys() - wanted:
            del self._cannot_start[what]

    def _may_try(self, what: str, spec: object) -> bool:
        """Whether to try starting ``what`` (of ``spec``) on this pass: its back-off is over, or its spec changed."""
        failed = self._cannot_start.get(what)
        return failed is None or failed.spec != spec or time.monotonic() >= failed.retry_at

    def _unstartable(self, what: str, spec: object, exc: Exception) -> None:
        """Log why ``what`` cannot start, once per distinct reason, and back off before trying it again.

        Each failure doubles the wait (0.5 s to 30 s, backoff.py): an agent whose archive download fails does
        not ask the manager (or S3) twice a second for ever. Another spec of it starts the back-off over.
        """
        reason = f"{type(exc).__name__}: {exc}"
        failed = self._cannot_start.get(what)
        if failed is None or failed.reason != reason:
            log.error("%s cannot start (retrying with back-off): %s", what, reason)
        if failed is None or failed.spec != spec:
            failed = _CannotStart(spec, reason, Backoff())
            self._cannot_start[what] = failed
        failed.reason = reason
        failed.retry_at = time.monotonic() + failed.backoff.failed()

    async def _reconcile_pipelines(self, deployments: list[Deployment], nodes: list[str] | None) -> set[str]:
        """Pipeline runtimes of the applications that need one (several stages or a shadow), this node's share.

        Returns the applications of which this node wants at least one pipeline replica.

        A replica runs the spec it started with. When an application's stages, variants or shadows, or its time
        budget (its stages' deployments' ``timeout_ms``), change (its ``spec_digest``), replicas of the new spec
        start beside the old ones, and the old ones are drained once the mesh has ``pipeline_replicas`` ready
        replicas of the new spec (make before break). ``nodes`` None: this node does not see itself (see
        reconcile), so it starts nothing and keeps what runs.
        """
        apps = {a.name: a for a in await self._desired.list_applications() if a.needs_pipeline}
        for pipelines in self.pipelines.values():
            for pipeline in pipelines:
                if pipeline.state == "ready" and not pipeline.alive():
                    await pipeline.handle_crash()
        ready = Counter((p.app, p.spec_digest) for p in await self._desired.list_pipelines() if p.state == "ready")
        topology = Topology(deployments={(d.model, d.version): d for d in deployments})
        budgets = {name: pipeline_timeout_ms(topology, app) for name, app in apps.items()}
        digests = {name: spec_digest(app, budgets[name]) for name, app in apps.items()}
        wanted: dict[str, int] = {}
        for name, app in apps.items():
            running = len([p for p in self.pipelines.get(name, []) if p.config.spec_digest == digests[name]])
            share_here = pipeline_share(name, app.pipeline_replicas, nodes, self._node) if nodes is not None else None
            wanted[name] = share_here if share_here is not None else min(app.pipeline_replicas, running)
        for name, pipelines in list(self.pipelines.items()):
            needed = apps.get(name)
            alive = [p for p in pipelines if p.state != "stopped"]
            if needed is None:
                self._stop_pipelines(name, alive)
                continue
            app = needed
            digest = digests[name]
            current = [p for p in alive if p.config.spec_digest == digest]
            outdated = [p for p in alive if p.config.spec_digest != digest]
            doomed = surplus(current, wanted[name], ready[(name, digest)], app.pipeline_replicas)
            if ready[(name, digest)] >= app.pipeline_replicas:
                doomed += outdated
            else:
                doomed += [p for p in outdated if p.state != "ready"]
            if doomed:
                self._stop_pipelines(name, doomed)
            now = time.monotonic()
            for pipeline in self.pipelines.get(name, []):
                if pipeline.state == "crashed" and now - pipeline.crashed_at >= pipeline.restart_delay():
                    pipeline.restarts += 1
                    self._launch(pipeline)
        for name, app in apps.items():
            digest = digests[name]
            have = len([p for p in self.pipelines.get(name, []) if p.config.spec_digest == digest])
            if have >= wanted[name]:
                continue
            what = _pipeline_what(name)
            if not self._may_try(what, app):
                continue
            try:
                config = await self._pipeline_config(app, digest, budgets[name])
            except Exception as exc:
                self._unstartable(what, app, exc)
                continue
            self._cannot_start.pop(what, None)
            if config is None:
                continue
            for _ in range(wanted[name] - have):
                pipeline = PipelineReplica(config, self._registry)
                self.pipelines.setdefault(name, []).append(pipeline)
                self._launch(pipeline)
        return {name for name, want in wanted.items() if want > 0}

    async def _pipeline_config(self, app: Application, digest: str, timeout_ms: int) -> PipelineReplicaConfig | None:
        """The config of new pipeline replicas of ``app``, its spec file written; None if a version is missing."""
        signatures: dict[str, Signature] = {}
        for model, version in members(app):
            record = await self._desired.get_model_version(model, version)
            if record is None:
                log.error("application %s names model version %s:%d, which is not registered", app.name, model, version)
                return None
            signatures[version_key(model, version)] = record.signature
        folder = self._workdir / "pipelines" / app.name / digest.removeprefix("sha256:")[:16]
        spec_path = await asyncio.to_thread(write_spec, folder, app, signatures)
        return PipelineReplicaConfig(
            app=app.name,
            spec_path=spec_path,
            spec_digest=digest,
            timeout_s=timeout_ms / 1000,
            node=self._node,
            advertise_address=self._advertise_address,
            xds_host=self._xds[0],
            xds_port=self._xds[1],
            workdir=self._workdir,
            drain_seconds=self._drain_seconds,
            ads_api_type=self._ads_api_type,
        )

    def _stop_pipelines(self, app: str, doomed: list[PipelineReplica]) -> None:
        remaining = [p for p in self.pipelines.get(app, []) if p not in doomed]
        if remaining:
            self.pipelines[app] = remaining
        else:
            self.pipelines.pop(app, None)
        self._retire(doomed)

    def _config(self, key: ModelKey, folder: Any, artifact: Artifact) -> ReplicaConfig:
        return ReplicaConfig(
            model=key[0],
            version=key[1],
            model_dir=folder,
            node=self._node,
            advertise_address=self._advertise_address,
            xds_host=self._xds[0],
            xds_port=self._xds[1],
            workdir=self._workdir,
            drain_seconds=self._drain_seconds,
            ads_api_type=self._ads_api_type,
            batching=self._batching.get(key),
            expect_digest=artifact.folder_digest,
            expected_files=artifact.files,
        )

    def _launch(self, replica: ProcessPair[Any]) -> None:
        async def run() -> None:
            try:
                await replica.start()
            except Exception as exc:
                log.error("replica %s failed to start: %s", replica.id, exc)

        task = asyncio.create_task(run())
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    def _stop(self, key: ModelKey, replicas: Iterable[Replica]) -> None:
        doomed = list(replicas)
        remaining = [r for r in self.replicas.get(key, []) if r not in doomed]
        if remaining:
            self.replicas[key] = remaining
        else:
            self.replicas.pop(key, None)
        self._retire(doomed)

    def _retire(self, doomed: Sequence[ProcessPair[Any]]) -> None:
        """Drain and stop ``doomed`` in the background (already out of this deployer's books)."""

        async def run() -> None:
            await asyncio.gather(*(r.stop() for r in doomed), return_exceptions=True)

        task = asyncio.create_task(run())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)
