"""Server-sent events of topology changes: etcd watch changes in, ``text/event-stream`` text out.

One SSE event per changed key: ``id`` is the etcd revision of the change, ``event`` is ``put`` or ``delete``,
``data`` is one JSON line ``{"kind", "key", "name", "revision", "value"}``. Changes already queued when the
stream wakes up (all the keys of one transaction arrive together) are written as one chunk, so a reader never
sees half a transaction followed by a long pause. A comment line (``: keepalive``) goes out when nothing
happened for ``heartbeat`` seconds, so idle-timeout proxies keep the stream open.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from manager_api.store import Change
from protos.topology import Keys

log = logging.getLogger(__name__)

#: Seconds of silence before a keepalive comment.
HEARTBEAT_SECONDS = 15.0
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
    changes: AsyncIterator[Change], keys: Keys, heartbeat: float = HEARTBEAT_SECONDS
) -> AsyncGenerator[str, None]:
    """SSE text for ``changes`` until they end (the watch broke: the client reconnects with Last-Event-ID)."""
    queue: asyncio.Queue[Change | None] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for change in changes:
                queue.put_nowait(change)
        except Exception as exc:
            log.warning("event stream: etcd watch ended: %s", exc)
        finally:
            queue.put_nowait(None)

    pump_task = asyncio.create_task(pump())
    try:
        while True:
            try:
                first = await asyncio.wait_for(queue.get(), heartbeat)
            except TimeoutError:
                yield KEEPALIVE
                continue
            batch = [first]
            while not queue.empty():
                batch.append(queue.get_nowait())
            chunk: list[str] = []
            for change in batch:
                if change is None:
                    if chunk:
                        yield "".join(chunk)
                    return
                data = describe(change, keys)
                if data is not None:
                    chunk.append(format_event(change, data))
            if chunk:
                yield "".join(chunk)
    finally:
        pump_task.cancel()
