"""Announces the node, its ready instances and its replicas' statuses in etcd under one lease per deployer.

The node record (``nodes/{name}``) shares the lease of the instances: the node stops counting for placement at
the very moment its endpoints leave EDS, so the survivors take its replicas over exactly when they are gone.

If the deployer dies, the lease expires after ``ttl`` seconds and every instance it announced leaves etcd, so
xds_control takes the endpoints out of EDS without anyone cleaning up; its replica statuses (``replicas/``) go
with them. If the lease is lost while the deployer lives (etcd restarted, a long pause), a new one is granted and
the live instances and statuses are announced again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aetcd

from protos.topology.instances import Instance, PipelineInstance
from protos.topology.keys import Keys
from protos.topology.nodes import Node
from protos.topology.replicas import PipelineReplicaStatus, ReplicaStatus

AnyInstance = Instance | PipelineInstance
AnyStatus = ReplicaStatus | PipelineReplicaStatus

log = logging.getLogger(__name__)


class LeasedInstanceRegistry:
    """The InstanceRegistry of the process deployer, backed by etcd leases."""

    def __init__(self, client: aetcd.Client, keys: Keys, node: str, ttl: int = 5, announce: Node | None = None) -> None:
        self._client = client
        self._keys = keys
        self._node = node
        self._ttl = ttl
        #: Written under the lease from start() on, so placement counts this node; None: instances only.
        self._announce = announce
        self._lease: aetcd.Lease | None = None
        self._live: dict[str, AnyInstance] = {}
        self._statuses: dict[str, AnyStatus] = {}
        #: Status keys whose delete failed: the lease outlives them, so the keep-alive loop deletes them later.
        self._uncleared: set[bytes] = set()
        self._keepalive: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Remove what a previous life of this node left behind, then keep a lease alive."""
        kinds: tuple[tuple[str, type[AnyInstance] | type[AnyStatus]], ...] = (
            (self._keys.instances(), Instance),
            (self._keys.replica_statuses(), ReplicaStatus),
            (self._keys.pipelines(), PipelineInstance),
            (self._keys.pipeline_statuses(), PipelineReplicaStatus),
        )
        for prefix, kind in kinds:
            result = await self._client.get_prefix(prefix.encode())
            for kv in result.kvs:
                with contextlib.suppress(ValueError):
                    if kind.model_validate_json(kv.value).node == self._node:
                        await self._client.delete(kv.key)
        if self._announce is not None:
            async with self._lock:
                await self._put_node(await self._current_lease())
        self._keepalive = asyncio.create_task(self._keep_alive())

    async def stop(self) -> None:
        """Stop refreshing and revoke the lease: every instance of this node leaves etcd now."""
        if self._keepalive is not None:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive
        if self._lease is not None:
            with contextlib.suppress(Exception):
                await self._lease.revoke()
        self._live.clear()
        self._statuses.clear()
        self._uncleared.clear()

    async def register_instance(self, instance: AnyInstance) -> None:
        async with self._lock:
            lease = await self._current_lease()
            await self._put(instance, lease)
            self._live[instance.id] = instance

    async def deregister_instance(self, instance: AnyInstance) -> None:
        async with self._lock:
            self._live.pop(instance.id, None)
            await self._client.delete(self._key(instance).encode())

    async def report_status(self, status: AnyStatus) -> None:
        """Write (or replace) a replica's status under the lease."""
        async with self._lock:
            lease = await self._current_lease()
            await self._put_status(status, lease)
            self._statuses[status.id] = status

    async def clear_status(self, status: AnyStatus) -> None:
        """Remove a stopped replica's status (retried by the keep-alive loop if etcd refuses now)."""
        key = self._status_key(status)
        async with self._lock:
            self._statuses.pop(status.id, None)
            self._uncleared.add(key)
            await self._client.delete(key)
            self._uncleared.discard(key)

    def _status_key(self, status: AnyStatus) -> bytes:
        if isinstance(status, PipelineReplicaStatus):
            return self._keys.pipeline_status(status.app, status.id).encode()
        return self._keys.replica_status(status.model, status.version, status.id).encode()

    async def _put_status(self, status: AnyStatus, lease: aetcd.Lease) -> None:
        key = self._status_key(status)
        # A newer status of the same replica wins over an older failed delete.
        self._uncleared.discard(key)
        await self._client.put(key, status.model_dump_json().encode(), lease=lease)

    def _key(self, instance: AnyInstance) -> str:
        if isinstance(instance, PipelineInstance):
            return self._keys.pipeline(instance.app, instance.id)
        return self._keys.instance(instance.model, instance.version, instance.id)

    async def _put(self, instance: AnyInstance, lease: aetcd.Lease) -> None:
        await self._client.put(self._key(instance).encode(), instance.model_dump_json().encode(), lease=lease)

    async def _put_node(self, lease: aetcd.Lease) -> None:
        if self._announce is not None:
            key = self._keys.node(self._announce.name).encode()
            await self._client.put(key, self._announce.model_dump_json().encode(), lease=lease)

    async def _current_lease(self) -> aetcd.Lease:
        if self._lease is None:
            self._lease = await self._client.lease(self._ttl)
        return self._lease

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self._ttl / 3)
            try:
                async with self._lock:
                    if self._lease is None:
                        continue
                    # One round trip: the keep-alive reply's TTL is 0 when the lease is already gone.
                    if (await self._lease.refresh()).TTL <= 0:
                        log.warning("node lease expired; announcing the node and %d instances again", len(self._live))
                        self._lease = await self._client.lease(self._ttl)
                        await self._put_node(self._lease)
                        for instance in self._live.values():
                            await self._put(instance, self._lease)
                        for status in self._statuses.values():
                            await self._put_status(status, self._lease)
                    for key in sorted(self._uncleared):
                        await self._client.delete(key)
                        self._uncleared.discard(key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("could not refresh the instance lease: %s", exc)
