"""The changes under the prefix as an etcd watch reports them: what ``TopologyStore.changes`` hands out.

``check_history`` runs first when the watch starts from a past revision: etcd would cancel such a watch only later.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal

import aetcd
import anyio
from aetcd import rpc
from aetcd.utils import prefix_range_end

from manager_api.store.errors import HistoryCompacted


@dataclass(frozen=True)
class Change:
    """One key changed under the prefix, as an etcd watch reports it; ``value`` is None for a delete."""

    type: Literal["put", "delete"]
    key: str
    revision: int
    value: bytes | None


class WatchedChanges:
    """The changes an etcd watch reports, as an async iterator; ``aclose`` cancels the watch at once.

    A reader that stops following early (manager_api/events.py cuts off a reader that fell too far behind) thus ends
    the watch before it leaves ``TopologyStore.changes``: the watch's own queue would otherwise keep growing.
    """

    def __init__(self, watch: Any) -> None:
        self._watch = watch
        self._events = watch.__aiter__()

    def __aiter__(self) -> WatchedChanges:
        return self

    async def __anext__(self) -> Change:
        event = await self._events.__anext__()
        put = event.kind == aetcd.EventKind.PUT
        return Change(
            type="put" if put else "delete",
            key=event.kv.key.decode(),
            revision=event.kv.mod_revision,
            value=event.kv.value if put else None,
        )

    async def aclose(self) -> None:
        """Cancel the watch (again on exit from ``changes``: harmless)."""
        # Shielded: a disconnected client cancels the request's task, and the cancel request must still reach
        # etcd or the watch would live as long as the manager.
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await self._watch.cancel()


async def check_history(client: aetcd.Client, prefix: bytes, revision: int, deadline: float) -> None:
    """Raise HistoryCompacted if etcd no longer has ``revision`` under ``prefix`` (``deadline``: of the read, seconds).

    etcd accepts a watch from a compacted revision and only then cancels it, after the response headers
    would be gone; a read at that revision fails at once instead.
    """
    request = rpc.RangeRequest(
        key=prefix, range_end=prefix_range_end(prefix), revision=revision, limit=1, keys_only=True
    )
    try:
        await client.kvstub.Range(request, timeout=deadline)
    except rpc.AioRpcError as exc:
        if "compacted" in (exc.details() or ""):
            raise HistoryCompacted(revision) from exc
        if "future revision" not in (exc.details() or ""):  # a future revision is fine: the watch waits
            raise
