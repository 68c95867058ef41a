"""etcd_stream.watch_prefix against a real etcd: events in order, a quiet stream kept alive by progress answers, a
silent one (blackholed by a TCP proxy) raising WatchStalled within its bound, a compacted start revision raising
WatchCompacted, and the etcd watch gone once the generator is closed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import aetcd
import pytest
from aetcd import rpc
from blackhole_proxy import BlackholeProxy
from etcd_metrics import etcd_watchers

from manager_api.etcd_server import EtcdServer
from manager_api.processes import wait_until
from xds_control.etcd_stream import WatchCompacted, WatchStalled, watch_prefix
from xds_control.etcd_watch import OWN_CONNECTION_OPTIONS

STALL_AFTER = 0.6


async def _client(endpoint: str) -> aetcd.Client:
    host, port = endpoint.split(":")
    client = aetcd.Client(host=host, port=int(port), options=OWN_CONNECTION_OPTIONS)
    await client.connect()
    return client


async def _revision(client: aetcd.Client) -> int:
    response = await client.kvstub.Range(rpc.RangeRequest(key=b"\0", count_only=True), timeout=10)
    return int(response.header.revision)


async def test_events_arrive_and_a_quiet_stream_stays_up(etcd_server: EtcdServer, etcd_prefix: str) -> None:
    client = await _client(etcd_server.endpoint)
    stream: AsyncGenerator[Sequence[Any], None] | None = None
    try:
        start = await _revision(client) + 1
        stream = watch_prefix(client.channel, etcd_prefix.encode(), start, STALL_AFTER)
        await client.put(f"{etcd_prefix}a".encode(), b"1")
        await client.put(b"/elsewhere/a", b"1")  # another prefix: not seen
        await client.put(f"{etcd_prefix}b".encode(), b"2")
        keys: list[bytes] = []
        while len(keys) < 2:
            batch = await asyncio.wait_for(anext(stream), 5)
            keys += [event.kv.key for event in batch]
        assert keys == [f"{etcd_prefix}a".encode(), f"{etcd_prefix}b".encode()]
        # Nothing happens under the prefix for several bounds: the progress answers keep the stream alive.
        with pytest.raises(TimeoutError):
            batch = await asyncio.wait_for(anext(stream), 4 * STALL_AFTER)
            assert not batch, f"no event under the prefix, got {batch}"
    finally:
        if stream is not None:
            await stream.aclose()
        await client.close()


async def test_a_silent_stream_raises_watch_stalled_within_its_bound(etcd_server: EtcdServer, etcd_prefix: str) -> None:
    host, port = etcd_server.endpoint.split(":")
    with BlackholeProxy(host, int(port)) as proxy:
        client = await _client(proxy.endpoint)
        try:
            stream = watch_prefix(client.channel, etcd_prefix.encode(), await _revision(client) + 1, STALL_AFTER)
            await client.put(f"{etcd_prefix}a".encode(), b"1")
            assert len(await asyncio.wait_for(anext(stream), 5)) == 0, "first, the watch is created"
            assert len(await asyncio.wait_for(anext(stream), 5)) == 1
            proxy.blackhole()
            blackholed_at = time.monotonic()
            with pytest.raises(WatchStalled):
                await asyncio.wait_for(anext(stream), 10)
            # At most one bound after the last answer, which came at most a third of a bound before.
            assert time.monotonic() - blackholed_at < 3 * STALL_AFTER
        finally:
            await client.close()


async def test_a_compacted_start_revision_raises_watch_compacted(etcd_server: EtcdServer, etcd_prefix: str) -> None:
    client = await _client(etcd_server.endpoint)
    try:
        first = (await client.put(f"{etcd_prefix}a".encode(), b"1")).header.revision
        await client.put(f"{etcd_prefix}a".encode(), b"2")
        # Compacts the session's etcd up to now: no other test holds an older revision (they run one at a time).
        await client.compact(await _revision(client))
        stream = watch_prefix(client.channel, etcd_prefix.encode(), first, STALL_AFTER)
        with pytest.raises(WatchCompacted):  # after the (empty) batch of the watch's creation
            for _ in range(2):
                await asyncio.wait_for(anext(stream), 5)
    finally:
        await client.close()


async def test_closing_the_stream_cancels_the_etcd_watch(etcd_server: EtcdServer, etcd_prefix: str) -> None:
    client = await _client(etcd_server.endpoint)
    try:
        before = etcd_watchers(etcd_server)
        stream = watch_prefix(client.channel, etcd_prefix.encode(), await _revision(client) + 1, STALL_AFTER)
        assert len(await asyncio.wait_for(anext(stream), 5)) == 0, "the watch is created"
        assert etcd_watchers(etcd_server) == before + 1
        await stream.aclose()
        await asyncio.to_thread(wait_until, lambda: etcd_watchers(etcd_server) == before, 10, "the watch gone")
    finally:
        await client.close()
