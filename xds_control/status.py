"""Writes what each connected proxy has acknowledged, and its last rejection, to ``proxies/{node_id}`` in etcd.

The keys hang on one lease of this xds_control process: when it dies, its proxies' records go with it, and the
replica they reconnect to writes them again. Writes are batched (at most one per node per ``interval``) so a
burst of ACKs does not become a burst of etcd writes; stream callbacks only mark a node dirty.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aetcd

from protos.topology.keys import Keys
from protos.topology.proxies import ProxyStatus
from protos.topology.records import now_iso
from xds_control.server import StreamCallbacks

log = logging.getLogger(__name__)

#: Most characters of a rejection's message kept in a record: Envoy's error_detail can be megabytes (one message
#: per rejected resource), and a put over etcd's request limit (1.5 MiB by default) would fail every flush.
MAX_NACK_CHARS = 4096
#: Appended to a message that was cut at MAX_NACK_CHARS.
TRUNCATED_MARKER = " [truncated]"


def capped(message: str, limit: int = MAX_NACK_CHARS) -> str:
    """``message`` cut to at most ``limit`` characters, the cut marked, so that a record stays small."""
    if len(message) <= limit:
        return message
    return message[: limit - len(TRUNCATED_MARKER)] + TRUNCATED_MARKER


class ProxyStatusWriter(StreamCallbacks):
    """Stream callbacks that keep ``proxies/`` in etcd up to date."""

    def __init__(
        self,
        client: aetcd.Client,
        keys: Keys,
        ttl: int = 10,
        interval: float = 0.2,
        retry_delay: float = 0.2,
        max_retry_delay: float = 5.0,
    ) -> None:
        self._client = client
        self._keys = keys
        self._ttl = ttl
        self._interval = interval
        self._min_retry_delay = retry_delay
        self._max_retry_delay = max_retry_delay
        #: Wait before the next attempt after a failed one; doubles while etcd stays away.
        self._retry_delay = retry_delay
        self._failing = False
        self._status: dict[str, ProxyStatus] = {}
        #: Open streams by node: a reconnecting Envoy opens its new stream before the server sees the old one end.
        self._streams: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._lease: aetcd.Lease | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop writing and revoke the lease: the records of this process's proxies disappear."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._lease is not None:
            with contextlib.suppress(Exception):
                await self._lease.revoke()

    def proxy_connected(self, node_id: str, role: str) -> None:
        self._streams[node_id] = self._streams.get(node_id, 0) + 1
        self._status[node_id] = ProxyStatus(node_id=node_id, role=role)
        self._mark(node_id)

    def on_ack(self, node_id: str, type_url: str, version: str) -> None:
        status = self._status.get(node_id)
        if status is not None:
            acked = {**status.acked, type_url.rsplit(".", 1)[-1]: version}
            self._status[node_id] = status.model_copy(update={"acked": acked})
            self._mark(node_id)

    def on_nack(self, node_id: str, type_url: str, version: str, error: str) -> None:
        status = self._status.get(node_id)
        if status is not None:
            message = capped(f"{type_url.rsplit('.', 1)[-1]} version {version}: {error}")
            self._status[node_id] = status.model_copy(update={"last_nack": message, "last_nack_at": now_iso()})
            self._mark(node_id)

    def on_stream_closed(self, node_id: str) -> None:
        remaining = self._streams.pop(node_id, 1) - 1
        if remaining > 0:
            self._streams[node_id] = remaining  # the proxy is still connected on a newer stream
            return
        if self._status.pop(node_id, None) is not None:
            self._mark(node_id)

    def _mark(self, node_id: str) -> None:
        self._dirty.add(node_id)
        self._wake.set()

    async def _run(self) -> None:
        while True:
            # Waking every ttl/3 without changes keeps the lease (and so the records) alive in quiet periods.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._ttl / 3)
            self._wake.clear()
            try:
                await self._flush_within_ttl()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._lease = None
                self._wake.set()
                delay = self._failed(exc)
                await self._reconnect()
                await asyncio.sleep(delay)
                continue
            self._succeeded()
            await asyncio.sleep(self._interval)  # batching window, not a readiness wait

    async def _flush_within_ttl(self) -> None:
        # aetcd sets no deadline: a call on a dead network path (no reset, so gRPC sees nothing wrong) would wait
        # for ever, and this writer with it. Past the TTL the lease is gone anyway.
        try:
            await asyncio.wait_for(self._flush(), self._ttl)
        except TimeoutError:
            raise ConnectionError(f"no answer from etcd within {self._ttl} s") from None

    async def _reconnect(self) -> None:
        # The next attempt goes out on a new connection: the one that failed may be dead for good. (The client is
        # this writer's own, on a local subchannel pool: see xds_control.etcd_watch.OWN_CONNECTION_OPTIONS.)
        with contextlib.suppress(Exception):
            await self._client.close()
        with contextlib.suppress(Exception):
            await self._client.connect()

    def _failed(self, exc: Exception) -> float:
        """Log a failed flush (one warning per outage) and return how long to wait before the next attempt."""
        if self._failing:
            log.debug("still cannot write proxy status to etcd: %s", exc)
        else:
            self._failing = True
            log.warning("could not write proxy status to etcd (retrying with back-off): %s", exc)
        delay = self._retry_delay
        # Doubling: an etcd that is away for minutes costs a few attempts (and leases), not five a second.
        self._retry_delay = min(delay * 2, self._max_retry_delay)
        return delay

    def _succeeded(self) -> None:
        if self._failing:
            self._failing = False
            log.info("proxy status written to etcd again")
        self._retry_delay = self._min_retry_delay

    async def _flush(self) -> None:
        lease = await self._current_lease()
        dirty, self._dirty = self._dirty, set()
        try:
            for node_id in sorted(dirty):
                key = self._keys.proxy(node_id).encode()
                status = self._status.get(node_id)
                if status is None:
                    await self._client.delete(key)
                else:
                    await self._client.put(key, status.model_dump_json().encode(), lease=lease)
        except BaseException:
            self._dirty |= dirty
            raise

    async def _current_lease(self) -> aetcd.Lease:
        if self._lease is not None:
            # One round trip: the keep-alive reply's TTL is 0 when the lease is already gone.
            if (await self._lease.refresh()).TTL > 0:
                return self._lease
        # A new lease: the lease expired (etcd restart, long pause), or a write failed and the old one is no longer
        # kept alive. Records left on the old lease would go with it: every live record is written again.
        self._dirty |= self._status.keys()
        self._lease = await self._client.lease(self._ttl)
        return self._lease
