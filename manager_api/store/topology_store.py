"""TopologyStore: typed reads and writes of models, deployments, applications and instances in etcd.

Model versions are numbered by an etcd transaction (create-if-absent), so two uploads racing for the same model
never get the same number.

Every write is one transaction that compares the written key's ``mod_revision`` with the one it read: a write
carrying the client's ``expected_revision`` fails with RevisionMismatch when the record moved on (optimistic
concurrency); a write without one re-reads and re-applies itself on top of whatever won the race, so concurrent
partial updates (scale vs. policies) never undo each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aetcd
from aetcd import rpc
from aetcd.exceptions import RevisionCompactedError
from aetcd.utils import prefix_range_end
from pydantic import ValidationError

from manager_api.store.changes import WatchedChanges, check_history
from manager_api.store.errors import ConflictError, HistoryCompacted, RevisionMismatch, VersionNotRegistered
from manager_api.store.etcd_ops import delete_op, mod_revision, put_op, read_op
from manager_api.store.records import CorruptRecord, RecordT, Stored, encoded_record
from manager_api.write_spans import note_revision, write_trace_context
from protos.topology.applications import Application
from protos.topology.deployments import Deployment
from protos.topology.instances import Instance, PipelineInstance
from protos.topology.keys import Keys
from protos.topology.models import Artifact, ModelVersion, Signature
from protos.topology.nodes import Node
from protos.topology.policies import Policies
from protos.topology.proxies import ProxyStatus
from protos.topology.records import now_iso
from protos.topology.replicas import PipelineReplicaStatus, ReplicaStatus

#: Attempts at numbering a new model version before giving up (each loses only to a concurrent upload).
_VERSION_ATTEMPTS = 20
#: Locks shared by the keys of one record kind; few, since writes are short.
_WRITE_LOCK_STRIPES = 64

#: Default deadline (seconds) of one etcd transaction, and of waiting for this process's turn to write a record.
DEFAULT_WRITE_TIMEOUT = 30.0


def _counter_value(value: bytes) -> int:
    """A version counter's number; 0 if it is not one (written by hand): the versions present still count."""
    try:
        return int(value)
    except ValueError:
        return 0


class TopologyStore:
    """Typed access to the desired state under one prefix."""

    def __init__(self, client: aetcd.Client, keys: Keys, write_timeout: float = DEFAULT_WRITE_TIMEOUT) -> None:
        """``write_timeout``: the deadline of one transaction, and of the wait for this process's earlier writes
        of the same record; the API passes its etcd deadline, so an etcd that stalls mid-write is a 503 within
        it rather than a request that waits for the stall (and others queued behind it, each in turn)."""
        self.client = client
        self.keys = keys
        self.write_timeout = write_timeout
        self._write_locks = [asyncio.Lock() for _ in range(_WRITE_LOCK_STRIPES)]

    @contextlib.asynccontextmanager
    async def _writer(self, key: bytes, what: str) -> AsyncIterator[None]:
        """Hold the lock this process's writers of ``key`` take turns on (one of a few stripes).

        Compare-and-swap alone keeps writes correct across processes, but 50 clients writing one record made most
        attempts lose the race and retry until they gave up (503); queueing them here first makes each write one
        transaction. Other manager processes still meet only the compare-and-swap. The wait is bounded: behind a
        write that etcd does not answer, the queue would otherwise take one etcd deadline per writer.
        """
        lock = self._write_locks[zlib.crc32(key) % _WRITE_LOCK_STRIPES]
        try:
            await asyncio.wait_for(lock.acquire(), self.write_timeout)
        except TimeoutError:
            raise ConflictError(
                f"{what}: earlier writes are still waiting for etcd after {self.write_timeout:g} s; try again"
            ) from None
        try:
            yield
        finally:
            lock.release()

    # --- models ---------------------------------------------------------------------------------------------

    async def register_model_version(
        self,
        name: str,
        runtime: str,
        artifact: Artifact,
        signature: Signature,
        labels: dict[str, str],
    ) -> Stored[ModelVersion]:
        """Store a new immutable version of ``name``, numbered after every number ever handed out for it."""
        for _ in range(_VERSION_ATTEMPTS):
            counter_key = self.keys.version_counter(name).encode()
            counter = await self.client.get(counter_key)
            last = _counter_value(counter.value) if counter is not None else 0
            number = max(last, await self._highest_version_key(name)) + 1
            record = ModelVersion(
                name=name, version=number, runtime=runtime, artifact=artifact, signature=signature, labels=labels
            )
            key = self.keys.model_version(name, number).encode()
            tx = self.client.transactions
            counter_revision = counter.mod_revision if counter is not None else 0
            response = await self._txn(
                # A concurrent upload moves the counter: whoever loses reads again and takes the next number.
                compare=[tx.create(key) == 0, tx.mod(counter_key) == counter_revision],
                success=[
                    put_op(key, encoded_record(f"model version {name}/{number}", record)),
                    put_op(counter_key, str(number).encode()),
                ],
            )
            if response.succeeded:
                note_revision(response.header.revision)
                return Stored(record, response.header.revision)
        raise ConflictError(f"could not number a new version of {name!r}: too many concurrent uploads")

    async def _highest_version_key(self, name: str) -> int:
        """The highest version number among the keys of ``name`` (0 if none): from the keys, not the values, so
        that a value broken by hand still holds its number."""
        prefix = self.keys.model_versions(name)
        found = await self.client.get_prefix(prefix.encode(), keys_only=True)
        numbers = [int(tail) for kv in found if (tail := kv.key.decode()[len(prefix) :]).isdigit()]
        return max(numbers, default=0)

    async def model_versions(self, name: str) -> list[ModelVersion]:
        """Every version of one model, oldest first."""
        return [s.record for s in await self.read_model_versions(name)]

    async def read_model_versions(self, name: str | None = None) -> list[Stored[ModelVersion]]:
        """Every version of one model (or of all models) with its revision, by name then version."""
        records = await self._list(self.keys.model_versions(name), ModelVersion)
        return sorted(records, key=lambda s: (s.record.name, s.record.version))

    async def all_model_versions(self) -> list[ModelVersion]:
        return [s.record for s in await self.read_model_versions()]

    async def get_model_version(self, name: str, version: int) -> ModelVersion | None:
        stored = await self.read_model_version(name, version)
        return stored.record if stored is not None else None

    async def read_model_version(self, name: str, version: int) -> Stored[ModelVersion] | None:
        return await self._get(self.keys.model_version(name, version), ModelVersion)

    async def delete_model_version(self, name: str, version: int, expected_revision: int | None = None) -> list[str]:
        """Delete an unused version; return what uses it instead (nothing deleted then).

        One transaction: the version's deployment must be absent and no application may have changed since
        the applications were read, so an application created meanwhile cannot end up naming a deleted version.
        Raises KeyError if the version does not exist, RevisionMismatch if it is not at ``expected_revision``,
        ConflictError if the race is lost too often.
        """
        what = f"model version {name}/{version}"
        key = self.keys.model_version(name, version).encode()
        for _ in range(_VERSION_ATTEMPTS):
            stored = await self.read_model_version(name, version)
            if stored is None:
                raise KeyError(f"{name}:{version}")
            if expected_revision is not None and expected_revision != stored.revision:
                raise RevisionMismatch(what, expected_revision, stored.revision, deleting=True)
            users = []
            # The raw key: a deployment whose record was broken by hand uses the version all the same.
            if await self.client.get(self.keys.deployment(name, version).encode()) is not None:
                users.append(f"deployment {name}:{version}")
            apps_prefix = self.keys.applications().encode()
            apps = await self.client.get_prefix(apps_prefix)
            for kv in apps:
                with contextlib.suppress(ValidationError):
                    app = Application.model_validate_json(kv.value)
                    named = {(v.model, v.version) for s in app.stages for v in s.variants}
                    named |= {(m.model, m.version) for s in app.stages for m in s.shadows}
                    if (name, version) in named:
                        users.append(f"application {app.name}")
            if users:
                return users
            tx = self.client.transactions
            revision = apps.header.revision
            response = await self._txn(
                compare=[
                    tx.mod(key) == stored.revision,
                    tx.version(self.keys.deployment(name, version).encode()) == 0,
                    tx.mod(apps_prefix, prefix_range_end(apps_prefix)) < revision + 1,
                ],
                success=[delete_op(key)],
                failure=[read_op(key)],
            )
            if response.succeeded:
                note_revision(response.header.revision)
                return []
            now = mod_revision(response, 0)
            if now == 0:
                raise KeyError(f"{name}:{version}")
            if expected_revision is not None and now != expected_revision:
                raise RevisionMismatch(what, expected_revision, now, deleting=True)
        raise ConflictError(f"could not delete {name}:{version}: the topology kept changing")

    # --- deployments ----------------------------------------------------------------------------------------

    async def put_deployment(
        self,
        model: str,
        version: int,
        replicas: int,
        policies: Policies | None = None,
        expected_revision: int | None = None,
    ) -> Stored[Deployment]:
        """Create or scale a deployment, keeping its creation time (and its policies when ``policies`` is None).

        Written only while the model version exists (pairs with delete_model_version). With
        ``expected_revision`` (0: must not exist yet) the write happens only if the deployment is still at that
        revision, else RevisionMismatch; without it, a lost race is re-read and re-applied. Raises KeyError if
        the model version is not registered.
        """
        what = f"deployment {model}/{version}"
        key = self.keys.deployment(model, version).encode()
        model_key = self.keys.model_version(model, version).encode()
        # Set on every write, also to None: a write made untraced must not keep the previous write's context.
        trace_context = write_trace_context()
        async with self._writer(key, what):
            for _ in range(_VERSION_ATTEMPTS):
                current, current_revision = await self._read_for_write(self.keys.deployment(model, version), Deployment)
                if expected_revision is not None and expected_revision != current_revision:
                    raise RevisionMismatch(what, expected_revision, current_revision)
                if current is None:
                    record = Deployment(
                        model=model,
                        version=version,
                        replicas=replicas,
                        policies=policies or Policies(),
                        trace_context=trace_context,
                    )
                else:
                    update: dict[str, object] = {
                        "replicas": replicas,
                        "updated_at": now_iso(),
                        "trace_context": trace_context,
                    }
                    if policies is not None:
                        update["policies"] = policies
                    record = current.record.model_copy(update=update)
                tx = self.client.transactions
                response = await self._txn(
                    compare=[tx.mod(key) == current_revision, tx.version(model_key) > 0],
                    success=[put_op(key, encoded_record(what, record))],
                    failure=[read_op(key), read_op(model_key)],
                )
                if response.succeeded:
                    note_revision(response.header.revision)
                    return Stored(record, response.header.revision)
                if mod_revision(response, 1) == 0:
                    raise KeyError(f"model version {model}:{version}")
                if expected_revision is not None:
                    raise RevisionMismatch(what, expected_revision, mod_revision(response, 0))
            raise ConflictError(f"{what}: too many concurrent writes, try again")

    async def get_deployment(self, model: str, version: int) -> Deployment | None:
        stored = await self.read_deployment(model, version)
        return stored.record if stored is not None else None

    async def read_deployment(self, model: str, version: int) -> Stored[Deployment] | None:
        return await self._get(self.keys.deployment(model, version), Deployment)

    async def list_deployments(self) -> list[Deployment]:
        return [s.record for s in await self.read_deployments()]

    async def read_deployments(self) -> list[Stored[Deployment]]:
        records = await self._list(self.keys.deployments(), Deployment)
        return sorted(records, key=lambda s: (s.record.model, s.record.version))

    async def delete_deployment(self, model: str, version: int, expected_revision: int | None = None) -> bool:
        """Delete a deployment; False if there was none, RevisionMismatch if not at ``expected_revision``."""
        return await self._delete_record(
            f"deployment {model}/{version}", self.keys.deployment(model, version), expected_revision
        )

    async def watch_deployments(self) -> AsyncIterator[None]:
        """Yields once per change under deployments/ (the deployer re-reads everything on each)."""
        async for _ in self._watch(self.keys.deployments()):
            yield None

    async def _watch(self, prefix: str) -> AsyncIterator[None]:
        watch = await self.client.watch_prefix(prefix.encode())
        try:
            async for _ in watch:
                yield None
        finally:
            with contextlib.suppress(Exception):
                await watch.cancel()

    # --- applications ---------------------------------------------------------------------------------------

    async def put_application(
        self, application: Application, expected_revision: int | None = None
    ) -> Stored[Application]:
        """Create or replace an application, keeping its creation time.

        Written only if every version it names still exists (pairs with delete_model_version's transaction),
        else VersionNotRegistered. ``expected_revision`` works as in put_deployment.
        """
        what = f"application {application.name}"
        key = self.keys.application(application.name).encode()
        # Shadows too: a shadow whose version is deleted meanwhile would leave the pipeline unable to start.
        named = sorted(
            {(v.model, v.version) for stage in application.stages for v in stage.variants}
            | {(s.model, s.version) for stage in application.stages for s in stage.shadows}
        )
        version_keys = [self.keys.model_version(m, v).encode() for m, v in named]
        trace_context = write_trace_context()
        async with self._writer(key, what):
            for _ in range(_VERSION_ATTEMPTS):
                current, current_revision = await self._read_for_write(
                    self.keys.application(application.name), Application
                )
                if expected_revision is not None and expected_revision != current_revision:
                    raise RevisionMismatch(what, expected_revision, current_revision)
                record = application.model_copy(update={"trace_context": trace_context})
                if current is not None:
                    kept = {"created_at": current.record.created_at, "updated_at": now_iso()}
                    record = record.model_copy(update=kept)
                tx = self.client.transactions
                response = await self._txn(
                    compare=[tx.mod(key) == current_revision, *(tx.version(k) > 0 for k in version_keys)],
                    success=[put_op(key, encoded_record(what, record))],
                    failure=[read_op(key), *(read_op(k) for k in version_keys)],
                )
                if response.succeeded:
                    note_revision(response.header.revision)
                    return Stored(record, response.header.revision)
                for index, (model, version) in enumerate(named):
                    if mod_revision(response, index + 1) == 0:  # deleted since the caller checked it
                        raise VersionNotRegistered(model, version)
                if expected_revision is not None:
                    raise RevisionMismatch(what, expected_revision, mod_revision(response, 0))
            raise ConflictError(f"{what}: too many concurrent writes, try again")

    async def get_application(self, name: str) -> Application | None:
        stored = await self.read_application(name)
        return stored.record if stored is not None else None

    async def read_application(self, name: str) -> Stored[Application] | None:
        return await self._get(self.keys.application(name), Application)

    async def list_applications(self) -> list[Application]:
        return [s.record for s in await self.read_applications()]

    async def read_applications(self) -> list[Stored[Application]]:
        records = await self._list(self.keys.applications(), Application)
        return sorted(records, key=lambda s: s.record.name)

    async def watch_applications(self) -> AsyncIterator[None]:
        """Yields once per change under applications/ (the deployer runs pipelines for some of them)."""
        async for _ in self._watch(self.keys.applications()):
            yield None

    async def delete_application(self, name: str, expected_revision: int | None = None) -> bool:
        """Delete an application; False if there was none, RevisionMismatch if not at ``expected_revision``."""
        return await self._delete_record(f"application {name}", self.keys.application(name), expected_revision)

    # --- instances (written by the deployer's registry, read here) ---------------------------------------------

    async def list_instances(self, model: str | None = None, version: int | None = None) -> list[Instance]:
        records = await self._list(self.keys.instances(model, version), Instance)
        return sorted((s.record for s in records), key=lambda i: (i.model, i.version, i.id))

    async def list_pipelines(self, app: str | None = None) -> list[PipelineInstance]:
        """Registered pipeline runtimes (leased, ready or draining), by application and id."""
        records = await self._list(self.keys.pipelines(app), PipelineInstance)
        return sorted((s.record for s in records), key=lambda p: (p.app, p.id))

    async def list_pipeline_statuses(self, app: str | None = None) -> list[PipelineReplicaStatus]:
        """Every pipeline replica's status, by application and id."""
        records = await self._list(self.keys.pipeline_statuses(app), PipelineReplicaStatus)
        return sorted((s.record for s in records), key=lambda r: (r.app, r.id))

    async def list_replica_statuses(self, model: str | None = None, version: int | None = None) -> list[ReplicaStatus]:
        """Every replica's status (leased, written by the deployer running it), by model, version and id."""
        records = await self._list(self.keys.replica_statuses(model, version), ReplicaStatus)
        return sorted((s.record for s in records), key=lambda r: (r.model, r.version, r.id))

    # --- nodes (leased, written by each deployer's registry; read by every deployer for placement) ----------------

    async def list_nodes(self) -> list[Node]:
        records = await self._list(self.keys.nodes(), Node)
        return sorted((s.record for s in records), key=lambda n: n.name)

    async def watch_nodes(self) -> AsyncIterator[None]:
        """Yields once per change under nodes/: a node joined, or its lease expired."""
        async for _ in self._watch(self.keys.nodes()):
            yield None

    # --- proxies (written by xds_control, read here) --------------------------------------------------------

    async def list_proxies(self) -> list[ProxyStatus]:
        records = await self._list(self.keys.proxies(), ProxyStatus)
        return sorted((s.record for s in records), key=lambda p: p.node_id)

    async def get_proxy(self, node_id: str) -> ProxyStatus | None:
        stored = await self._get(self.keys.proxy(node_id), ProxyStatus)
        return stored.record if stored is not None else None

    # --- changes --------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def changes(self, after_revision: int | None = None) -> AsyncIterator[WatchedChanges]:
        """Watch everything under the prefix: changes made after ``after_revision`` (None: from now on).

        The watch exists once this is entered (changes made afterwards are never missed) and is cancelled on
        exit, also when the caller is being cancelled. Raises HistoryCompacted if etcd no longer has
        ``after_revision + 1``.
        """
        start = after_revision + 1 if after_revision is not None else None
        if start is not None:
            await check_history(self.client, self.keys.prefix.encode(), start, self.write_timeout)
        try:
            watch = await self.client.watch_prefix(self.keys.prefix.encode(), start_revision=start)
        except RevisionCompactedError as exc:
            raise HistoryCompacted(start or 0) from exc

        changes = WatchedChanges(watch)
        try:
            yield changes
        finally:
            await changes.aclose()

    # --- plumbing -------------------------------------------------------------------------------------------

    async def ping(self) -> None:
        """Raises if etcd does not answer."""
        await self.client.status()

    async def _txn(
        self, compare: Sequence[Any], success: Sequence[rpc.RequestOp], failure: Sequence[rpc.RequestOp] = ()
    ) -> Any:
        """One etcd transaction; the raw TxnResponse, whose header revision is the revision of the writes."""
        request = rpc.TxnRequest(
            compare=[c.build_message() for c in compare], success=list(success), failure=list(failure)
        )
        return await self.client.kvstub.Txn(request, timeout=self.write_timeout)

    async def _delete_record(self, what: str, key: str, expected_revision: int | None) -> bool:
        tx = self.client.transactions
        raw = key.encode()
        compare = [tx.version(raw) > 0]
        if expected_revision is not None:
            compare.append(tx.mod(raw) == expected_revision)
        response = await self._txn(compare, success=[delete_op(raw)], failure=[read_op(raw)])
        if response.succeeded:
            note_revision(response.header.revision)
            return True
        current = mod_revision(response, 0)
        if current == 0:
            return False
        raise RevisionMismatch(what, expected_revision or 0, current, deleting=True)

    async def _get(self, key: str, kind: type[RecordT]) -> Stored[RecordT] | None:
        """The record at ``key``, None if absent; CorruptRecord if its value does not parse."""
        result = await self.client.get(key.encode())
        if result is None:
            return None
        try:
            return Stored(kind.model_validate_json(result.value), result.mod_revision)
        except ValidationError as exc:
            raise CorruptRecord(key, kind.__name__, exc) from exc

    async def _read_for_write(self, key: str, kind: type[RecordT]) -> tuple[Stored[RecordT] | None, int]:
        """The record a write replaces and the revision to compare: (None, 0) if absent, (None, its revision) if
        its value does not parse, so that a PUT replaces a record broken by hand (with etcdctl) instead of failing
        on it like every read."""
        result = await self.client.get(key.encode())
        if result is None:
            return None, 0
        with contextlib.suppress(ValidationError):
            return Stored(kind.model_validate_json(result.value), result.mod_revision), result.mod_revision
        return None, result.mod_revision

    async def _list(self, prefix: str, kind: type[RecordT]) -> list[Stored[RecordT]]:
        result = await self.client.get_prefix(prefix.encode())
        records = []
        for kv in result:
            # A value written by hand (etcdctl) that does not parse is skipped, not fatal to every listing.
            with contextlib.suppress(ValidationError):
                records.append(Stored(kind.model_validate_json(kv.value), kv.mod_revision))
        return records
