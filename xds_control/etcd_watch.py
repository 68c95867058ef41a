"""Follows the desired state in etcd and hands consistent, debounced topologies to a consumer.

A full read gives a revision; the watch starts right after it, so no event is missed or applied twice. A burst
of events (a rollout writes many keys) becomes one update: the consumer is called after ``quiet`` seconds
without events, and at the latest ``max_delay`` seconds after the first event of the burst. If the watch
breaks (etcd restart, compaction), the state is read again in full.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import aetcd
from aetcd import rpc
from aetcd.utils import prefix_range_end

from protos.topology import Keys
from xds_control.topology import Topology, TopologyRecords

log = logging.getLogger(__name__)

#: Keys per range request when reading the whole state.
READ_PAGE = 2000
#: gRPC options of etcd clients: a watch response carrying a big transaction can pass the 4 MiB default.
ETCD_CLIENT_OPTIONS = {"grpc.max_receive_message_length": 256 * 1024 * 1024}


class EtcdTopologyWatch:
    """Reads and watches everything under the prefix; calls ``consumer`` with each new Topology."""

    def __init__(
        self,
        client: aetcd.Client,
        keys: Keys,
        consumer: Callable[[Topology], None],
        quiet: float = 0.03,
        max_delay: float = 0.3,
    ) -> None:
        self._client = client
        self._keys = keys
        self._consumer = consumer
        self._quiet = quiet
        self._max_delay = max_delay
        self._records = TopologyRecords(keys)
        self._revision = 0

    async def run(self) -> None:
        """Run until cancelled, re-reading everything after any watch failure (with back-off)."""
        backoff = 0.2
        while True:
            try:
                await self._load()
                backoff = 0.2
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("etcd watch failed (%s); reading the state again in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _load(self) -> None:
        self._records.reload([(key, value) async for key, value in self._read_all()])
        # A full read is no change: the writes behind the records it found were published before (or are lost
        # to the watch failure that made it read again).
        self._records.take_writes()
        self._publish()

    async def _read_all(self) -> AsyncIterator[tuple[str, bytes]]:
        """Every key and value under the prefix at one revision (which becomes ``self._revision``)."""
        # Paged at one revision: a single range of 10,000 deployments is ~15 MB, past gRPC's message limits,
        # and pages read at the first page's revision still form one consistent cut.
        prefix = self._keys.prefix.encode()
        end = prefix_range_end(prefix)
        start, revision = prefix, 0
        while True:
            request = rpc.RangeRequest(key=start, range_end=end, limit=READ_PAGE, revision=revision)
            response = await self._client.kvstub.Range(request, timeout=60)
            revision = revision or response.header.revision
            for kv in response.kvs:
                yield kv.key.decode(), kv.value
            if not response.more or not response.kvs:
                break
            start = response.kvs[-1].key + b"\0"
        self._revision = revision

    def _publish(self, observed_at: float = 0.0) -> None:
        self._consumer(self._records.topology(self._revision, observed_at, self._records.take_writes()))

    async def _follow(self) -> None:
        events: asyncio.Queue[aetcd.Event] = asyncio.Queue()
        watch = await self._client.watch_prefix(self._keys.prefix.encode(), start_revision=self._revision + 1)

        async def pump() -> None:
            async for event in watch:
                events.put_nowait(event)

        pump_task = asyncio.create_task(pump())
        try:
            while True:
                self._apply(await self._next(events, pump_task, None))
                # Convergence is measured from here: the first event of the burst, before the debounce.
                first_event_at = time.monotonic()
                deadline = asyncio.get_running_loop().time() + self._max_delay
                while True:
                    remaining = deadline - asyncio.get_running_loop().time()
                    if remaining <= 0:
                        break
                    try:
                        event = await self._next(events, pump_task, min(self._quiet, remaining))
                    except TimeoutError:
                        break
                    self._apply(event)
                self._publish(first_event_at)
        finally:
            pump_task.cancel()
            with contextlib.suppress(Exception):
                await watch.cancel()

    @staticmethod
    async def _next(
        events: asyncio.Queue[aetcd.Event], pump_task: asyncio.Task[None], within: float | None
    ) -> aetcd.Event:
        getter = asyncio.ensure_future(events.get())
        done, _ = await asyncio.wait({getter, pump_task}, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        if pump_task in done:
            exc = pump_task.exception()
            raise ConnectionError(f"watch ended: {exc}" if exc else "watch ended")
        raise TimeoutError

    def _apply(self, event: aetcd.Event) -> None:
        key = event.kv.key.decode()
        if event.kind == aetcd.EventKind.PUT:
            self._records.put(key, event.kv.value)
        else:
            self._records.delete(key)
        self._revision = max(self._revision, event.kv.mod_revision)
