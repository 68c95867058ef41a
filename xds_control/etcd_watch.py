"""Follows the desired state in etcd and hands consistent, debounced topologies to a consumer.

A full read gives a revision; the watch starts right after it, so no event is missed or applied twice. A burst
of events (a rollout writes many keys) becomes one update: the consumer is called after ``quiet`` seconds
without events, and at the latest ``max_delay`` seconds after the first event of the burst. If the watch
breaks (etcd restart, compaction), the state is read again in full on a new connection. If it goes silent
(no answer, not even to the progress requests of etcd_stream, for ``timeout`` seconds: a dead network path, a
stopped etcd), it is started again on a new connection from the revision after the last event applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aetcd
from aetcd import rpc
from aetcd.utils import prefix_range_end

from protos.topology.keys import Keys
from xds_control.etcd_stream import WatchStalled, watch_prefix
from xds_control.topology import Topology, TopologyRecords

log = logging.getLogger(__name__)

#: Keys per range request when reading the whole state.
READ_PAGE = 2000
#: gRPC options of etcd clients: a watch response carrying a big transaction can pass the 4 MiB default.
ETCD_CLIENT_OPTIONS = {"grpc.max_receive_message_length": 256 * 1024 * 1024}
#: Those of a client that reconnects after a failure (the watch's, the proxy status writer's): its channel has
#: connections of its own. gRPC otherwise shares connections between channels to the same target, so a new
#: channel would get the very connection found dead.
OWN_CONNECTION_OPTIONS = {**ETCD_CLIENT_OPTIONS, "grpc.use_local_subchannel_pool": 1}
#: Seconds without any answer on the watch stream after which it is taken for dead.
WATCH_TIMEOUT_S = 15.0


class EtcdTopologyWatch:
    """Reads and watches everything under the prefix; calls ``consumer`` with each new Topology."""

    def __init__(
        self,
        client: aetcd.Client,
        keys: Keys,
        consumer: Callable[[Topology], None],
        quiet: float = 0.03,
        max_delay: float = 0.3,
        timeout: float = WATCH_TIMEOUT_S,
    ) -> None:
        """``client`` is the watch's own: it is closed and connected again after a failure (a new connection)."""
        self._client = client
        self._timeout = timeout
        self._keys = keys
        self._consumer = consumer
        self._quiet = quiet
        self._max_delay = max_delay
        self._records = TopologyRecords(keys)
        self._revision = 0
        #: Watch attempts in a row that stalled (the current outage's).
        self._stalls = 0

    async def run(self) -> None:
        """Run until cancelled: after a silent watch, watch again from the last revision; after any other
        failure, read everything again (with back-off). Either way on a new connection."""
        backoff = 0.2
        loaded = False
        while True:
            try:
                if not loaded:
                    await self._load()
                    loaded = True
                backoff = 0.2
                await self._follow()
            except asyncio.CancelledError:
                raise
            except WatchStalled as exc:
                # One warning per outage (a long one stalls every attempt), one info line when it is over.
                self._stalls += 1
                log.log(
                    logging.WARNING if self._stalls == 1 else logging.DEBUG,
                    "etcd watch stalled (%s); watching again from revision %d on a new connection",
                    exc,
                    self._revision + 1,
                )
                await self._reconnect()
            except Exception as exc:
                loaded = False
                log.warning("etcd watch failed (%s); reading the state again in %.1f s", exc, backoff)
                await self._reconnect()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _reconnect(self) -> None:
        # gRPC keeps a connection that silently drops everything (no RST) for as long as the kernel does: only
        # a new one is sure to reach etcd again.
        with contextlib.suppress(Exception):
            await self._client.close()
        with contextlib.suppress(Exception):
            await self._client.connect()

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
        events: asyncio.Queue[Any] = asyncio.Queue()
        prefix = self._keys.prefix.encode()
        stream = watch_prefix(
            self._client.channel, prefix, self._revision + 1, self._timeout, self._client.metadata or ()
        )

        async def pump() -> None:
            async for batch in stream:
                if self._stalls:
                    log.info("etcd watch answers again after %d stalled attempt(s)", self._stalls)
                    self._stalls = 0
                for event in batch:
                    events.put_nowait(event)

        pump_task = asyncio.create_task(pump())
        try:
            while True:
                self._apply(await self._next(events, pump_task, None))
                # Convergence is measured from here: the first event of the burst, before the debounce.
                first_event_at = time.monotonic()
                try:
                    await self._rest_of_burst(events, pump_task)
                except ConnectionError:
                    # The watch resumes after the last event applied: what was applied must be published now.
                    self._publish(first_event_at)
                    raise
                self._publish(first_event_at)
        finally:
            pump_task.cancel()
            with contextlib.suppress(BaseException):
                await pump_task

    async def _rest_of_burst(self, events: asyncio.Queue[Any], pump_task: asyncio.Task[None]) -> None:
        """Apply the events that follow within the debounce's quiet period and hard cap."""
        deadline = asyncio.get_running_loop().time() + self._max_delay
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            try:
                event = await self._next(events, pump_task, min(self._quiet, remaining))
            except TimeoutError:
                return
            self._apply(event)

    @staticmethod
    async def _next(events: asyncio.Queue[Any], pump_task: asyncio.Task[None], within: float | None) -> Any:
        getter = asyncio.ensure_future(events.get())
        done, _ = await asyncio.wait({getter, pump_task}, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        if pump_task in done:
            exc = pump_task.exception()
            if isinstance(exc, ConnectionError):
                raise exc
            raise ConnectionError(f"watch ended: {exc}" if exc else "watch ended")
        raise TimeoutError

    def _apply(self, event: Any) -> None:
        """Apply one ``mvccpb.Event``."""
        key = event.kv.key.decode()
        if event.type == rpc.Event.PUT:
            self._records.put(key, event.kv.value)
        else:
            self._records.delete(key)
        self._revision = max(self._revision, event.kv.mod_revision)
