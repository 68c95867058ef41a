"""The desired state in etcd: typed reads and writes of models, deployments, applications and instances.

The only module of manager_api that talks to etcd. Key layout lives in ``protos.topology.Keys``; values are the
records of ``protos.topology``. Model versions are numbered by an etcd transaction (create-if-absent), so two
uploads racing for the same model never get the same number.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

import aetcd
from aetcd.utils import prefix_range_end
from pydantic import BaseModel, ValidationError

from protos.topology import (
    Application,
    Artifact,
    Deployment,
    Instance,
    Keys,
    ModelVersion,
    Node,
    Policies,
    ProxyStatus,
    Signature,
    now_iso,
)

RecordT = TypeVar("RecordT", bound=BaseModel)

#: Attempts at numbering a new model version before giving up (each loses only to a concurrent upload).
_VERSION_ATTEMPTS = 20


class ConflictError(RuntimeError):
    """A write lost a race too many times; the caller may retry."""


class TopologyStore:
    """Typed access to the desired state under one prefix."""

    def __init__(self, client: aetcd.Client, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    # --- models ---------------------------------------------------------------------------------------------

    async def register_model_version(
        self,
        name: str,
        runtime: str,
        artifact: Artifact,
        signature: Signature,
        labels: dict[str, str],
    ) -> ModelVersion:
        """Store a new immutable version of ``name``, numbered after every number ever handed out for it."""
        for _ in range(_VERSION_ATTEMPTS):
            counter_key = self.keys.version_counter(name).encode()
            counter = await self.client.get(counter_key)
            last = int(counter.value) if counter is not None else 0
            existing = await self.model_versions(name)
            number = max([last, *(m.version for m in existing)]) + 1
            record = ModelVersion(
                name=name, version=number, runtime=runtime, artifact=artifact, signature=signature, labels=labels
            )
            key = self.keys.model_version(name, number).encode()
            tx = self.client.transactions
            counter_revision = counter.mod_revision if counter is not None else 0
            created, _ = await self.client.transaction(
                # A concurrent upload moves the counter: whoever loses reads again and takes the next number.
                compare=[tx.create(key) == 0, tx.mod(counter_key) == counter_revision],
                success=[tx.put(key, record.model_dump_json().encode()), tx.put(counter_key, str(number).encode())],
                failure=[],
            )
            if created:
                return record
        raise ConflictError(f"could not number a new version of {name!r}: too many concurrent uploads")

    async def model_versions(self, name: str) -> list[ModelVersion]:
        """Every version of one model, oldest first."""
        records = await self._list(self.keys.model_versions(name), ModelVersion)
        return sorted(records, key=lambda m: m.version)

    async def all_model_versions(self) -> list[ModelVersion]:
        records = await self._list(self.keys.model_versions(), ModelVersion)
        return sorted(records, key=lambda m: (m.name, m.version))

    async def get_model_version(self, name: str, version: int) -> ModelVersion | None:
        return await self._get(self.keys.model_version(name, version), ModelVersion)

    async def delete_model_version(self, name: str, version: int) -> list[str]:
        """Delete an unused version; return what uses it instead (nothing deleted then).

        One transaction: the version's deployment must be absent and no application may have changed since
        the applications were read, so an application created meanwhile cannot end up naming a deleted version.
        Raises KeyError if the version does not exist, ConflictError if the race is lost too often.
        """
        for _ in range(_VERSION_ATTEMPTS):
            if await self.get_model_version(name, version) is None:
                raise KeyError(f"{name}:{version}")
            users = []
            if await self.get_deployment(name, version) is not None:
                users.append(f"deployment {name}:{version}")
            apps_prefix = self.keys.applications().encode()
            apps = await self.client.get_prefix(apps_prefix)
            for kv in apps:
                with contextlib.suppress(ValidationError):
                    app = Application.model_validate_json(kv.value)
                    if any((v.model, v.version) == (name, version) for s in app.stages for v in s.variants):
                        users.append(f"application {app.name}")
            if users:
                return users
            tx = self.client.transactions
            revision = apps.header.revision
            deleted, _ = await self.client.transaction(
                compare=[
                    tx.version(self.keys.deployment(name, version).encode()) == 0,
                    tx.mod(apps_prefix, prefix_range_end(apps_prefix)) < revision + 1,
                ],
                success=[tx.delete(self.keys.model_version(name, version).encode())],
                failure=[],
            )
            if deleted:
                return []
        raise ConflictError(f"could not delete {name}:{version}: the topology kept changing")

    # --- deployments ----------------------------------------------------------------------------------------

    async def put_deployment(
        self, model: str, version: int, replicas: int, policies: Policies | None = None
    ) -> Deployment:
        """Create or scale a deployment, keeping its creation time (and its policies when ``policies`` is None)."""
        current = await self.get_deployment(model, version)
        if current is None:
            record = Deployment(model=model, version=version, replicas=replicas, policies=policies or Policies())
        else:
            update: dict[str, object] = {"replicas": replicas, "updated_at": now_iso()}
            if policies is not None:
                update["policies"] = policies
            record = current.model_copy(update=update)
        await self.client.put(self.keys.deployment(model, version).encode(), record.model_dump_json().encode())
        return record

    async def get_deployment(self, model: str, version: int) -> Deployment | None:
        return await self._get(self.keys.deployment(model, version), Deployment)

    async def list_deployments(self) -> list[Deployment]:
        records = await self._list(self.keys.deployments(), Deployment)
        return sorted(records, key=lambda d: (d.model, d.version))

    async def delete_deployment(self, model: str, version: int) -> bool:
        return await self.client.delete(self.keys.deployment(model, version).encode()) is not None

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

    async def put_application(self, application: Application) -> Application:
        """Create or replace an application, keeping its creation time."""
        current = await self.get_application(application.name)
        if current is not None:
            application = application.model_copy(update={"created_at": current.created_at, "updated_at": now_iso()})
        key = self.keys.application(application.name).encode()
        tx = self.client.transactions
        # Written only if every version it names still exists: pairs with delete_model_version's transaction.
        named = {(v.model, v.version) for stage in application.stages for v in stage.variants}
        written, _ = await self.client.transaction(
            compare=[tx.version(self.keys.model_version(m, v).encode()) > 0 for m, v in sorted(named)],
            success=[tx.put(key, application.model_dump_json().encode())],
            failure=[],
        )
        if not written:
            raise ConflictError(f"application {application.name}: a model version it names was deleted meanwhile")
        return application

    async def get_application(self, name: str) -> Application | None:
        return await self._get(self.keys.application(name), Application)

    async def list_applications(self) -> list[Application]:
        records = await self._list(self.keys.applications(), Application)
        return sorted(records, key=lambda a: a.name)

    async def delete_application(self, name: str) -> bool:
        return await self.client.delete(self.keys.application(name).encode()) is not None

    # --- instances (written by the deployer's registry, read here) ---------------------------------------------

    async def list_instances(self, model: str | None = None, version: int | None = None) -> list[Instance]:
        records = await self._list(self.keys.instances(model, version), Instance)
        return sorted(records, key=lambda i: (i.model, i.version, i.id))

    # --- nodes (leased, written by each deployer's registry; read by every deployer for placement) ----------------

    async def list_nodes(self) -> list[Node]:
        records = await self._list(self.keys.nodes(), Node)
        return sorted(records, key=lambda n: n.name)

    async def watch_nodes(self) -> AsyncIterator[None]:
        """Yields once per change under nodes/: a node joined, or its lease expired."""
        async for _ in self._watch(self.keys.nodes()):
            yield None

    # --- proxies (written by xds_control, read here) --------------------------------------------------------

    async def list_proxies(self) -> list[ProxyStatus]:
        records = await self._list(self.keys.proxies(), ProxyStatus)
        return sorted(records, key=lambda p: p.node_id)

    async def get_proxy(self, node_id: str) -> ProxyStatus | None:
        return await self._get(self.keys.proxy(node_id), ProxyStatus)

    # --- plumbing -------------------------------------------------------------------------------------------

    async def ping(self) -> None:
        """Raises if etcd does not answer."""
        await self.client.status()

    async def _get(self, key: str, kind: type[RecordT]) -> RecordT | None:
        result = await self.client.get(key.encode())
        if result is None:
            return None
        return kind.model_validate_json(result.value)

    async def _list(self, prefix: str, kind: type[RecordT]) -> list[RecordT]:
        result = await self.client.get_prefix(prefix.encode())
        records = []
        for kv in result:
            # A value written by hand (etcdctl) that does not parse is skipped, not fatal to every listing.
            with contextlib.suppress(ValidationError):
                records.append(kind.model_validate_json(kv.value))
        return records
