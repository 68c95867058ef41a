"""Replica statuses in the deployer's registry, against a real etcd: leased like the node, cleaned, re-announced."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import aetcd
import pytest

from manager_api.deployer.backoff import BACKOFF_RESET_SECONDS
from manager_api.deployer.registration import LeasedInstanceRegistry
from manager_api.deployer.replica import Replica, ReplicaConfig
from manager_api.etcd_server import EtcdServer
from manager_api.store.topology_store import TopologyStore
from protos.topology.instances import Instance
from protos.topology.keys import Keys
from protos.topology.nodes import Node
from protos.topology.replicas import ReplicaStatus

TTL = 2


@pytest.fixture
async def client(etcd_server: EtcdServer) -> AsyncIterator[aetcd.Client]:
    host, port = etcd_server.endpoint.rsplit(":", 1)
    async with aetcd.Client(host=host, port=int(port)) as client:
        yield client


def status(node: str, n: int, state: str = "starting") -> ReplicaStatus:
    return ReplicaStatus.model_validate(
        {"model": "iris", "version": 1, "id": f"{node}-{n}", "node": node, "state": state, "address": "10.0.0.1"}
    )


async def eventually(check: Callable[[], Awaitable[bool]], deadline: float) -> None:
    started = time.monotonic()
    while time.monotonic() - started < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not true after {deadline} s")


async def test_a_status_is_replaced_cleared_and_leased_with_the_node(client: aetcd.Client, etcd_prefix: str) -> None:
    keys = Keys(etcd_prefix)
    store = TopologyStore(client, keys)
    registry = LeasedInstanceRegistry(client, keys, "h1", ttl=TTL, announce=Node(name="h1", advertise_address="a"))
    await registry.start()
    try:
        await registry.report_status(status("h1", 1))
        await registry.report_status(status("h1", 1, "ready"))
        await registry.report_status(status("h1", 2, "crash-looping"))
        assert [(s.id, s.state) for s in await store.list_replica_statuses("iris", 1)] == [
            ("h1-1", "ready"),
            ("h1-2", "crash-looping"),
        ]
        # Under the node's lease: the same lease id as the node record.
        node_kv = await client.get(keys.node("h1").encode())
        status_kv = await client.get(keys.replica_status("iris", 1, "h1-1").encode())
        assert node_kv is not None and status_kv is not None and status_kv.lease == node_kv.lease != 0
        await registry.clear_status(status("h1", 2))
        assert [s.id for s in await store.list_replica_statuses()] == ["h1-1"]
    finally:
        await registry.stop()
    assert await store.list_replica_statuses() == []


async def test_a_new_life_of_a_node_removes_its_old_statuses_only(client: aetcd.Client, etcd_prefix: str) -> None:
    keys = Keys(etcd_prefix)
    store = TopologyStore(client, keys)
    # Left without a lease (as by an older deployer, or by hand): only a new life of h1 may remove h1's.
    for left in (status("h1", 9), status("h2", 9)):
        key = keys.replica_status(left.model, left.version, left.id)
        await client.put(key.encode(), left.model_dump_json().encode())
    registry = LeasedInstanceRegistry(client, keys, "h1", ttl=TTL)
    await registry.start()
    try:
        assert [s.id for s in await store.list_replica_statuses()] == ["h2-9"]
    finally:
        await registry.stop()


async def test_statuses_are_announced_again_when_the_lease_is_lost(client: aetcd.Client, etcd_prefix: str) -> None:
    keys = Keys(etcd_prefix)
    store = TopologyStore(client, keys)
    registry = LeasedInstanceRegistry(client, keys, "h1", ttl=TTL, announce=Node(name="h1", advertise_address="a"))
    await registry.start()
    try:
        await registry.register_instance(
            Instance(model="iris", version=1, id="h1-1", node="h1", address="10.0.0.1", port=9001)
        )
        await registry.report_status(status("h1", 1, "ready"))
        lost = await client.get(keys.replica_status("iris", 1, "h1-1").encode())
        assert lost is not None
        # As if etcd had forgotten the lease (restart, long pause): everything under it goes at once.
        await client.revoke_lease(lost.lease)
        assert await store.list_replica_statuses() == []

        async def back() -> bool:
            found = await store.list_replica_statuses()
            return [(s.id, s.state) for s in found] == [("h1-1", "ready")] and len(await store.list_instances()) == 1

        await eventually(back, TTL * 3)
        again = await client.get(keys.replica_status("iris", 1, "h1-1").encode())
        assert again is not None and again.lease != lost.lease
    finally:
        await registry.stop()


async def test_a_crash_after_a_long_ready_run_restarts_after_the_shortest_delay_again(
    client: aetcd.Client, etcd_prefix: str, tmp_path: Path
) -> None:
    keys = Keys(etcd_prefix)
    store = TopologyStore(client, keys)
    registry = LeasedInstanceRegistry(client, keys, "h1", ttl=TTL, announce=Node(name="h1", advertise_address="a"))
    config = ReplicaConfig(
        node="h1", xds_host="127.0.0.1", xds_port=1, workdir=tmp_path, model="iris", version=1, model_dir=tmp_path
    )
    replica = Replica(config, registry)
    await registry.start()

    async def crash_after_ready_for(seconds: float) -> float:
        """The replica was ready for ``seconds`` and crashed: the delay its status announces, then its restart."""
        replica.ready_since = time.monotonic() - seconds
        await replica.handle_crash()
        [reported] = await store.list_replica_statuses("iris", 1)
        assert reported.state == "crash-looping" and reported.next_restart_at is not None
        delay = (datetime.fromisoformat(reported.next_restart_at) - datetime.now(UTC)).total_seconds()
        replica.restarts += 1  # what the deployer does when it starts the pair again
        return delay

    try:
        # Crashes in a row back off, 0.5 s doubling to 30 s...
        delays = [await crash_after_ready_for(1.0) for _ in range(8)]
        assert [round(d * 2) / 2 for d in delays] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0], delays
        # ...but a crash after ten minutes of serving is not the ninth of that run: the shortest delay again.
        assert round(await crash_after_ready_for(BACKOFF_RESET_SECONDS + 1) * 2) / 2 == 0.5
        assert round(await crash_after_ready_for(1.0) * 2) / 2 == 1.0
    finally:
        await registry.stop()
