"""``/api/v1/events``: topology changes as server-sent events, resumable by revision."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping
from typing import Annotated

import anyio
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from manager_api.dependencies import Store
from manager_api.errors import ApiProblem
from manager_api.events import event_stream
from manager_api.schemas import MAX_REVISION, ErrorBody

router = APIRouter(prefix="/events", tags=["events"])

#: The largest revision to follow on from: the watch starts at the next one, which must still be an etcd revision.
_LAST_POSITION = MAX_REVISION - 1

_EXAMPLE = (
    "id: 42\nevent: put\n"
    'data: {"kind":"deployment","key":"/hydro/deployments/iris/1","name":"iris/1","revision":42,'
    '"value":{"model":"iris","version":1,"replicas":2,"...":"..."}}\n\n'
    ": keepalive\n\n"
)


class _ClosingStream(StreamingResponse):
    """A streaming response that runs ``on_close`` however it ends: finished, failed, or client gone.

    The watch is opened before the response (so a compacted ``since`` can still be a 410); if the client
    left before the body started, the body generator never runs its own cleanup, hence this hook.
    """

    def __init__(
        self,
        content: AsyncIterable[str],
        on_close: Callable[[], Awaitable[object]],
        media_type: str,
        headers: Mapping[str, str],
    ) -> None:
        super().__init__(content, media_type=media_type, headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._on_close()


class StreamSlots:
    """How many event streams are open, against the most allowed (``--max-event-streams``).

    Each stream holds an etcd watch and a task for as long as its client reads; without a bound, clients could open
    them until the manager or etcd ran out. Used from the event loop only (no lock).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

    def take(self) -> None:
        """One more stream, or a 503 with Retry-After when all are in use."""
        if self.open >= self.limit:
            raise ApiProblem(
                503,
                f"too many event streams are open (the manager's --max-event-streams is {self.limit}): close one, "
                "or retry later",
                headers={"Retry-After": "5"},
            )
        self.open += 1

    def give_back(self) -> None:
        """A stream ended."""
        self.open -= 1


def _resume_point(since: int | None, last_event_id: str | None) -> int | None:
    # EventSource sends Last-Event-ID when it reconnects to the same URL: it is newer than the URL's since.
    if last_event_id is None or not last_event_id.strip():
        return since
    try:
        revision = int(last_event_id)
    except ValueError:
        revision = -1
    if not 0 <= revision <= _LAST_POSITION:
        allowed = f"an integer from 0 to {_LAST_POSITION}"
        raise ApiProblem(400, f"Last-Event-ID must be an etcd revision ({allowed}), got {last_event_id!r}")
    return revision


@router.get(
    "",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {"example": _EXAMPLE}}, "description": "one event per changed key"},
        400: {"model": ErrorBody, "description": "Last-Event-ID is not a revision"},
        410: {"model": ErrorBody, "description": "the requested revision was compacted away: read the state again"},
        503: {"model": ErrorBody, "description": "as many streams are open as --max-event-streams allows"},
    },
)
async def events(
    request: Request,
    store: Store,
    since: Annotated[
        int | None,
        Query(
            ge=0,
            le=_LAST_POSITION,
            description="send the changes made after this revision (e.g. the `revision` of a GET) first",
        ),
    ] = None,
    last_event_id: Annotated[
        str | None, Header(description="the `id` of the last event seen; takes precedence over `since`")
    ] = None,
) -> StreamingResponse:
    """Stream every change of models, deployments, applications, instances and proxies as it happens.

    Without ``since`` or ``Last-Event-ID`` the stream starts now. Each event's ``id`` is its etcd revision;
    the events of one transaction share it. ``: keepalive`` comments are sent every 15 s of silence.
    """
    after = _resume_point(since, last_event_id)
    slots: StreamSlots = request.app.state.event_streams
    slots.take()
    exits = contextlib.AsyncExitStack()
    exits.callback(slots.give_back)
    try:
        changes = await exits.enter_async_context(store.changes(after))
    except BaseException:
        await exits.aclose()
        raise
    heartbeat: float = request.app.state.events_heartbeat
    return _ClosingStream(
        event_stream(changes, store.keys, heartbeat),
        on_close=exits.aclose,
        media_type="text/event-stream",
        # no-transform and X-Accel-Buffering: proxies (nginx) must pass each event on at once, not buffer.
        headers={"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"},
    )
