"""A span per snapshot published to a proxy, from its build until the proxy acknowledged every changed type.

The controller calls ``published`` after it set a node's new snapshot; the ADS streams' callbacks add what
happened next as span events (a response sent, its ACK or NACK) and end the span. The span is a child of the
manager write whose change it publishes (the ``trace_context`` the manager stored in the changed record, see
manager_api/write_spans.py), so the API call and the push share one trace in Jaeger; when one debounced push
carries several writes it is the child of the newest and links to all of them.

A span ends, with ``hydro.xds.outcome`` saying how, when every changed type is ACKed (``acked``), on a NACK
(``nacked``, status ERROR), when the stream closes (``stream closed``), when the next snapshot of the node
replaces it (``superseded``), or ``abandon_after`` seconds after it began (``unacknowledged``: a type the
proxy never asked for again, or a proxy that hangs). Everything runs on the server's event loop: no locks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tracing.provider import active_tracer
from xds_control.resources import type_urls
from xds_control.server import StreamCallbacks
from xds_control.snapshot import Snapshot
from xds_control.translate import NodeInfo

#: Seconds after which a push still waiting for ACKs is ended as ``unacknowledged``.
ABANDON_AFTER = 30.0
#: Most write spans one push links to (the newest ones): a rollout can write thousands of records at once.
MAX_LINKS = 32
_W3C = TraceContextTextMapPropagator()


def short_type(type_url: str) -> str:
    """``Cluster`` for ``type.googleapis.com/envoy.config.cluster.v3.Cluster``."""
    return type_url.rsplit(".", 1)[-1]


def write_contexts(traceparents: Sequence[str]) -> list[trace.SpanContext]:
    """The valid span contexts among W3C traceparents (anything unreadable is skipped)."""
    contexts = []
    for traceparent in traceparents[-MAX_LINKS:]:
        context = trace.get_current_span(_W3C.extract({"traceparent": traceparent})).get_span_context()
        if context.is_valid:
            contexts.append(context)
    return contexts


@dataclass
class _Push:
    span: trace.Span
    waiting: set[str]
    sent: dict[str, str] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = None


class PushSpans(StreamCallbacks):
    """Stream callbacks plus ``published``; does nothing while ``active_tracer()`` is None."""

    def __init__(self, abandon_after: float = ABANDON_AFTER) -> None:
        self._abandon_after = abandon_after
        self._open: dict[str, _Push] = {}

    def published(
        self,
        info: NodeInfo,
        revision: int,
        before: Snapshot | None,
        after: Snapshot,
        writes: Sequence[str],
        started_ns: int,
    ) -> None:
        """``after`` replaced ``before`` as the snapshot of ``info``'s node, built from the etcd state at
        ``revision`` (which carries the manager writes ``writes``, W3C traceparents) since ``started_ns``."""
        previous = self._open.pop(info.node_id, None)
        if previous is not None:
            _end(previous, "superseded")
        tracer = active_tracer()
        if tracer is None:
            return
        # A type empty before and after may never be asked for (RDS when listeners route inline): not waited for.
        changed = {
            t
            for t in type_urls.PUSH_ORDER
            if (before.versions.get(t) if before is not None else None) != after.versions.get(t)
            and (after.items(t) or (before is not None and before.items(t)))
        }
        if not changed:
            return
        contexts = write_contexts(writes)
        parent = trace.set_span_in_context(trace.NonRecordingSpan(contexts[-1])) if contexts else None
        attributes: dict[str, str | int] = {
            "hydro.xds.node_id": info.node_id,
            "hydro.xds.role": info.role or "unknown",
            "hydro.etcd.revision": revision,
            "hydro.xds.changed_types": ",".join(sorted(short_type(t) for t in changed)),
            "hydro.xds.resources": sum(len(after.items(t)) for t in type_urls.PUSH_ORDER),
            "hydro.xds.writes": len(writes),
        }
        for type_url in type_urls.PUSH_ORDER:
            name = short_type(type_url)
            attributes[f"hydro.xds.{name}.version"] = after.versions.get(type_url, "")
            attributes[f"hydro.xds.{name}.resources"] = len(after.items(type_url))
        span = tracer.start_span(
            f"xds push {info.node_id}",
            context=parent,
            kind=SpanKind.INTERNAL,
            links=[Link(context) for context in contexts],
            attributes=attributes,
            start_time=started_ns,
        )
        span.add_event("snapshot built", timestamp=time.time_ns())
        push = _Push(span, changed)
        self._open[info.node_id] = push
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # driven without a loop (a unit test): only superseding or the proxy's answers end it
        push.timer = loop.call_later(self._abandon_after, self._abandon, info.node_id, push)

    def on_response(self, node_id: str, type_url: str, version: str, size: int, resources: int) -> None:
        push = self._open.get(node_id)
        if push is None or type_url not in push.waiting:
            return
        push.sent[type_url] = version
        push.span.add_event(
            "response",
            {"xds.type": short_type(type_url), "xds.version": version, "xds.resources": resources, "xds.bytes": size},
        )

    def on_ack(self, node_id: str, type_url: str, version: str) -> None:
        push = self._open.get(node_id)
        if push is None or push.sent.get(type_url) != version:
            return
        push.span.add_event("ack", {"xds.type": short_type(type_url), "xds.version": version})
        push.waiting.discard(type_url)
        if not push.waiting:
            del self._open[node_id]
            _end(push, "acked")

    def on_nack(self, node_id: str, type_url: str, version: str, error: str) -> None:
        push = self._open.get(node_id)
        # A NACK of an older version (sent before this push) says nothing about this one.
        if push is None or type_url not in push.waiting or push.sent.get(type_url) != version:
            return
        del self._open[node_id]
        push.span.add_event("nack", {"xds.type": short_type(type_url), "xds.version": version, "xds.error": error})
        push.span.set_status(Status(StatusCode.ERROR, f"{short_type(type_url)} {version} rejected: {error}"))
        _end(push, "nacked")

    def on_stream_closed(self, node_id: str) -> None:
        push = self._open.pop(node_id, None)
        if push is not None:
            _end(push, "stream closed")

    def close(self) -> None:
        """End every open span (xds_control is stopping): an unended span is never exported."""
        for push in self._open.values():
            _end(push, "shutdown")
        self._open.clear()

    def _abandon(self, node_id: str, push: _Push) -> None:
        if self._open.get(node_id) is push:
            del self._open[node_id]
            _end(push, "unacknowledged")


def _end(push: _Push, outcome: str) -> None:
    if push.timer is not None:
        push.timer.cancel()
    push.span.set_attribute("hydro.xds.outcome", outcome)
    push.span.set_attribute("hydro.xds.unacknowledged_types", ",".join(sorted(short_type(t) for t in push.waiting)))
    push.span.end()
