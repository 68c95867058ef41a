"""One etcd Watch stream over a key prefix that fails loudly instead of going quiet.

aetcd's watcher gives no way to tell a quiet prefix from a dead stream: progress notifications (the answers
without events that say "nothing happened up to revision N") are dropped before its callbacks, and nothing times
out. A partitioned member, a stopped etcd or a network path that silently drops packets (no RST, so gRPC sees
nothing) would leave the watch waiting for ever while etcd changes. So the stream is driven here, on etcd's
own Watch RPC:

- every ``stall_after / 3`` seconds a progress request goes out; etcd answers it at once on a live stream, so
  any answer (events or progress) within ``stall_after`` shows the stream lives, and none raises ``WatchStalled``;
- the stream carries ``hasleader: true`` (etcd's require-leader option): a member cut off from its cluster's
  leader ends the watch with an error instead of serving its stale state quietly.

Progress answers are not used to move the resume revision: older etcd releases could send one ahead of events
still queued for the stream (etcd issue 15220), and resuming from there would lose those events.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import grpc
from aetcd import rpc
from aetcd.utils import prefix_range_end

#: gRPC metadata asking etcd to end the watch when its member has no leader (clientv3.WithRequireLeader).
REQUIRE_LEADER = ("hasleader", "true")


class WatchStalled(ConnectionError):
    """Nothing came on the watch stream for longer than its bound: the stream or its connection is dead."""


class WatchCompacted(ConnectionError):
    """The revision to resume from is compacted away: the state must be read again in full."""


async def watch_prefix(
    channel: grpc.aio.Channel,
    prefix: bytes,
    start_revision: int,
    stall_after: float,
    metadata: Sequence[tuple[str, str]] = (),
) -> AsyncGenerator[Sequence[Any], None]:
    """Yield the events (``mvccpb.Event``) of each watch response under ``prefix`` from ``start_revision`` on;
    the first batch, empty, once etcd has created the watch (it answers: the stream works).

    Raises WatchStalled when nothing (not even the answer to a progress request) arrives within ``stall_after``
    seconds, WatchCompacted when ``start_revision`` is gone, ConnectionError when etcd cancels the watch (a member
    without a leader) and grpc errors as the stream raises them. Closing the generator ends the RPC.
    """
    requests: asyncio.Queue[rpc.WatchRequest] = asyncio.Queue()
    create = rpc.WatchCreateRequest(key=prefix, range_end=prefix_range_end(prefix), start_revision=start_revision)
    requests.put_nowait(rpc.WatchRequest(create_request=create))

    async def outgoing() -> AsyncIterator[rpc.WatchRequest]:
        while True:
            yield await requests.get()

    async def ask_for_progress() -> None:
        while True:
            await asyncio.sleep(stall_after / 3)
            requests.put_nowait(rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()))

    call = rpc.WatchStub(channel).Watch(outgoing(), metadata=(REQUIRE_LEADER, *metadata))
    ticker = asyncio.create_task(ask_for_progress())
    try:
        while True:
            try:
                response = await asyncio.wait_for(call.read(), stall_after)
            except TimeoutError:
                raise WatchStalled(f"no answer from etcd for {stall_after:g} s") from None
            if response is grpc.aio.EOF:
                raise ConnectionError("etcd ended the watch stream")
            if response.compact_revision:
                raise WatchCompacted(f"revision {start_revision} is compacted (to {response.compact_revision})")
            if response.canceled:
                raise ConnectionError(f"etcd cancelled the watch: {response.cancel_reason or 'no reason given'}")
            if response.created or response.events:
                yield response.events
    finally:
        ticker.cancel()
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
