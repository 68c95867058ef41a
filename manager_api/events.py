"""Server-sent events of topology changes: etcd watch changes in, ``text/event-stream`` text out.

One SSE event per changed key: ``id`` is the etcd revision of the change, ``event`` is ``put`` or ``delete``,
``data`` is one JSON line ``{"kind", "key", "name", "revision", "value"}``. Changes already queued when the
stream wakes up (all the keys of one transaction arrive together) are written as one chunk, so a reader never
sees half a transaction followed by a long pause. A comment line (``: keepalive``) goes out when nothing
happened for ``heartbeat`` seconds, so idle-timeout proxies keep the stream open.

A reader slower than the changes gets at most ``backlog`` changes queued for it: past that its stream is cut off,
what was queued is dropped and the etcd watch cancelled at once, so memory stays bounded even for a client that
holds its connection open and reads nothing. Nothing is lost: the client reconnects with Last-Event-ID (the last
id it did receive, always a whole revision) and etcd replays the rest from history (unless etcd compacted it in
between: then the reconnect is a 410). A stream is only cut once its queue spans two revisions, so one huge
transaction never loops a client through reconnects; a client that opened the stream without ``since`` and had
received no event yet resumes from "now".
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from manager_api.store.changes import Change
from protos.topology.keys import Keys

log = logging.getLogger(__name__)

#: Seconds of silence before a keepalive comment.
HEARTBEAT_SECONDS = 15.0
#: Changes queued for one stream before a reader that does not keep up is cut off (it resumes by revision).
BACKLOG = 10_000
KEEPALIVE = ": keepalive\n\n"

#: etcd key segment -> the ``kind`` clients see; other keys (e.g. version counters) are internal and not sent.
KINDS = {
    "models": "model",
    "deployments": "deployment",
    "applications": "application",
    "instances": "instance",
    "proxies": "proxy",
    "nodes": "node",
    "replicas": "replica",
    "pipelines": "pipeline",
    "pipeline-replicas": "pipeline-replica",
}


def describe(change: Change, keys: Keys) -> dict[str, Any] | None:
    """The ``data`` of the event for ``change``, or None for a key clients do not see."""
    segment = keys.kind_of(change.key)
    kind = KINDS.get(segment or "")
    if kind is None:
        return None
    value: Any = None
    if change.value is not None:
        try:
            value = json.loads(change.value)
        except ValueError:  # written by hand with etcdctl: pass it on as text rather than drop the event
            value = change.value.decode(errors="replace")
    return {
        "kind": kind,
        "key": change.key,
        "name": change.key[len(keys.prefix) + len(f"{segment}/") :],
        "revision": change.revision,
        "value": value,
    }


def format_event(change: Change, data: dict[str, Any]) -> str:
    """One SSE event; the JSON is compact, so it is a single ``data:`` line."""
    return f"id: {change.revision}\nevent: {change.type}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def event_stream(
    changes: AsyncIterator[Change], keys: Keys, heartbeat: float = HEARTBEAT_SECONDS, backlog: int = BACKLOG
) -> AsyncGenerator[str, None]:
    """SSE text for ``changes`` until they end (the watch broke, or the reader fell ``backlog`` changes behind:
    either way the client reconnects with Last-Event-ID)."""
    queue: collections.deque[Change] = collections.deque()
    arrived = asyncio.Event()
    ended = False

    async def pump() -> None:
        nonlocal ended
        try:
            async for change in changes:
                if len(queue) >= backlog and queue[0].revision != change.revision:
                    log.warning(
                        "event stream: reader fell %d changes behind at revision %d; cut off, it resumes from there",
                        len(queue),
                        queue[0].revision,
                    )
                    queue.clear()
                    break
                queue.append(change)
                arrived.set()
        except Exception as exc:
            log.warning("event stream: etcd watch ended: %s", exc)
        finally:
            ended = True
            arrived.set()
            close = getattr(changes, "aclose", None)
            if close is not None:
                await close()

    pump_task = asyncio.create_task(pump())
    try:
        while True:
            if not queue and not ended:
                arrived.clear()
                try:
                    await asyncio.wait_for(arrived.wait(), heartbeat)
                except TimeoutError:
                    yield KEEPALIVE
                    continue
            if not queue:  # ended and drained
                return
            chunk: list[str] = []
            while queue:
                change = queue.popleft()
                data = describe(change, keys)
                if data is not None:
                    chunk.append(format_event(change, data))
            if chunk:
                yield "".join(chunk)
    finally:
        pump_task.cancel()
