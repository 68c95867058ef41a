"""Spans of the manager's writes: one server span per PUT/POST/PATCH/DELETE under /api/v1.

The span is the current span while the request runs, so the store can say which etcd revision the write made
(``note_revision``) and put the span's W3C traceparent into the records it writes (``write_trace_context``):
xds_control reads it back from etcd and makes its push a child of this span (docs/tracing.md). Reads, the
event stream, health and metrics are not traced: they change nothing, and a probe every second would bury the
writes in Jaeger.

A small middleware of our own rather than opentelemetry-instrumentation-fastapi: that package traces every
request (reads and health included, plus a span per ASGI send), and the project's spans are hand-rolled so
that with tracing off the cost is one global lookup (``active_tracer()``), here and in the store.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tracing.provider import active_tracer

#: Methods that change the desired state.
WRITE_METHODS = frozenset({"PUT", "POST", "PATCH", "DELETE"})
#: Only the REST API's writes are traced (health and metrics live outside it).
API_PREFIX = "/api/v1/"
#: How much of an error response is read for its ``{"error": ...}`` message.
_ERROR_BODY_MAX = 4096
_W3C = TraceContextTextMapPropagator()


class WriteSpans:
    """ASGI middleware: a span around each write request, child of the caller's traceparent if it sent one.

    Attributes: ``http.request.method``, ``http.route`` (the route template), ``http.response.status_code``,
    ``hydro.resource.kind`` (models, deployments, applications...), ``hydro.resource.name`` (its path
    parameters joined by ``/``), ``hydro.etcd.revision`` (set by the store), and for error answers
    ``error.type`` (the status) and ``hydro.error`` (the ``error`` of the body). Status ERROR on 5xx and on
    exceptions, as the HTTP semantic conventions have it for servers.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tracer = active_tracer()
        if (
            tracer is None
            or scope["type"] != "http"
            or scope["method"] not in WRITE_METHODS
            or not scope["path"].startswith(API_PREFIX)
        ):
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
        answer = _Answer()

        async def observing_send(message: Message) -> None:
            answer.observe(message)
            await send(message)

        with tracer.start_as_current_span(
            f"{method} {scope['path']}",
            context=_W3C.extract(headers),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope["path"]},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                await self.app(scope, receive, observing_send)
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                raise
            finally:
                _describe(span, method, scope, answer)


class _Answer:
    """The status and (for errors) the start of the body of the response being sent."""

    def __init__(self) -> None:
        self.status = 0
        self.error_body = bytearray()

    def observe(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
        elif message["type"] == "http.response.body" and self.status >= 400:
            room = _ERROR_BODY_MAX - len(self.error_body)
            if room > 0:
                self.error_body += message.get("body", b"")[:room]

    def error_message(self) -> str | None:
        try:
            body = json.loads(self.error_body)
        except ValueError:
            return None
        message = body.get("error") if isinstance(body, dict) else None
        return str(message) if message is not None else None


def route_template(scope: Scope) -> str | None:
    """The matched route as a template (``/api/v1/applications/{name}``), None when no route matched.

    The router puts the matched route into the scope it shares with this middleware. Since FastAPI 0.16x a route
    of an included router knows only its path below the router's prefix (``/applications/{name}``): the prefix
    is then the part of the request path in front of the segments the route matched.
    """
    path = getattr(scope.get("route"), "path", None)
    if not isinstance(path, str):
        return None
    segments = scope["path"].rstrip("/").split("/")
    matched = path.rstrip("/").count("/")
    prefix = "/".join(segments[: len(segments) - matched]) if len(segments) > matched else ""
    return prefix + path


def _describe(span: trace.Span, method: str, scope: Scope, answer: _Answer) -> None:
    route = route_template(scope)
    if route is not None:
        span.update_name(f"{method} {route}")
        span.set_attribute("http.route", route)
        kind, _, _ = route.removeprefix(API_PREFIX).partition("/")
        span.set_attribute("hydro.resource.kind", kind)
    params: Mapping[str, object] = scope.get("path_params") or {}
    if params:
        span.set_attribute("hydro.resource.name", "/".join(str(value) for value in params.values()))
    if answer.status:
        span.set_attribute("http.response.status_code", answer.status)
    if answer.status >= 400:
        span.set_attribute("error.type", str(answer.status))
        message = answer.error_message()
        if message is not None:
            span.set_attribute("hydro.error", message)
    if answer.status >= 500:
        span.set_status(Status(StatusCode.ERROR, answer.error_message() or f"HTTP {answer.status}"))


def write_trace_context() -> str | None:
    """The W3C traceparent of the write span being served, to store with the records it writes; None when
    tracing is off or the write is not traced (the record then carries no trace context)."""
    if active_tracer() is None:
        return None
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return carrier.get("traceparent")


def note_revision(revision: int) -> None:
    """Put the etcd revision a write made on the write span being served (nothing when not tracing)."""
    if active_tracer() is None:
        return
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("hydro.etcd.revision", revision)
