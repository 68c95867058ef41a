"""A deployer's node record shares the lease of its instances, against a real etcd.

When the deployer stops, both leave at once; when it is SIGKILLed (no more keep-alives), both expire together after the
TTL, which is what moves its replicas to the other nodes exactly when its endpoints leave EDS.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aetcd
import pytest

from manager_api.deployer.registration import LeasedInstanceRegistry
from manager_api.etcd_server import EtcdServer
from manager_api.processes import ChildProcess
from manager_api.store.topology_store import TopologyStore
from protos.topology.instances import Instance
from protos.topology.keys import Keys
from protos.topology.nodes import Node

TTL = 2


@pytest.fixture
async def client(etcd_server: EtcdServer) -> AsyncIterator[aetcd.Client]:
    host, port = etcd_server.endpoint.rsplit(":", 1)
    async with aetcd.Client(host=host, port=int(port)) as client:
        yield client


def instance(node: str, n: int) -> Instance:
    return Instance(model="iris", version=1, id=f"{node}-{n}", node=node, address="10.0.0.1", port=9000 + n)


async def seconds_until(check: Callable[[], Awaitable[bool]], deadline: float) -> float:
    """Seconds until ``check`` returned True (polled), or AssertionError after ``deadline`` seconds."""
    started = time.monotonic()
    while time.monotonic() - started < deadline:
        if await check():
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise AssertionError(f"not true after {deadline} s")


async def test_the_node_is_live_from_start_and_leaves_with_its_instances_on_stop(
    client: aetcd.Client, etcd_prefix: str
) -> None:
    keys = Keys(etcd_prefix)
    store = TopologyStore(client, keys)
    node = Node(name="h1", advertise_address="10.0.0.1")
    registry = LeasedInstanceRegistry(client, keys, "h1", ttl=TTL, announce=node)
    await registry.start()
    try:
        assert [n.name for n in await store.list_nodes()] == ["h1"]
        assert (await store.list_nodes())[0].advertise_address == "10.0.0.1"
        await registry.register_instance(instance("h1", 1))
        # Kept alive past the TTL.
        await asyncio.sleep(TTL * 1.5)
        assert [n.name for n in await store.list_nodes()] == ["h1"]
        assert [i.id for i in await store.list_instances()] == ["h1-1"]
    finally:
        await registry.stop()
    assert await store.list_nodes() == []
    assert await store.list_instances() == []


#: A deployer's registry alone in a process of its own, so that it can die by SIGKILL.
DOOMED = """
import asyncio, sys
import aetcd
from manager_api.deployer.registration import LeasedInstanceRegistry
from protos.topology.instances import Instance
from protos.topology.keys import Keys
from protos.topology.nodes import Node

async def main(host, port, prefix, ttl):
    client = aetcd.Client(host=host, port=int(port))
    await client.connect()
    registry = LeasedInstanceRegistry(
        client, Keys(prefix), "h1", ttl=int(ttl), announce=Node(name="h1", advertise_address="10.0.0.1")
    )
    await registry.start()
    await registry.register_instance(
        Instance(model="iris", version=1, id="h1-1", node="h1", address="10.0.0.1", port=9001)
    )
    await asyncio.Event().wait()

asyncio.run(main(*sys.argv[1:]))
"""


async def test_a_killed_deployer_s_node_and_instances_expire_together(
    client: aetcd.Client, etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path
) -> None:
    keys = Keys(etcd_prefix)
    store = TopologyStore(client, keys)
    alive = LeasedInstanceRegistry(client, keys, "h2", ttl=TTL, announce=Node(name="h2", advertise_address="b"))
    await alive.start()
    host, port = etcd_server.endpoint.rsplit(":", 1)
    doomed = ChildProcess(
        "doomed-registry",
        [sys.executable, "-c", DOOMED, host, port, etcd_prefix, str(TTL)],
        log_path=tmp_path / "doomed.log",
    ).start()
    try:
        await alive.register_instance(instance("h2", 1))

        async def both_registered() -> bool:
            return len(await store.list_instances()) == 2

        await seconds_until(both_registered, 30)
        assert [n.name for n in await store.list_nodes()] == ["h1", "h2"]
        doomed.signal_group(signal.SIGKILL)

        async def h1_gone() -> bool:
            return [n.name for n in await store.list_nodes()] == ["h2"]

        waited = await seconds_until(h1_gone, TTL + 3)
        # Same lease: by the time the node is gone its instances are too (and the survivor's are not).
        assert [i.id for i in await store.list_instances()] == ["h2-1"]
        assert waited <= TTL + 1.5
    finally:
        doomed.stop()
        await alive.stop()
