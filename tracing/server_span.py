"""Server spans under a W3C ``traceparent``, made without the SDK's general span machinery.

Every traced inference makes one server span whose parent is the sidecar Envoy's span. Through the SDK's
``Tracer.start_span`` that costs ~35 us of the event loop's time (context extraction, the sampler, attribute
validation through ABC checks, two lock-guarded attribute writes, a ReadableSpan copy at the end) for what is a
handful of scalars. ``ServerSpans`` makes the same span for the common case - a valid ``traceparent``, no
``tracestate``, the SDK's default parent-based sampler, default span limits - and hands it to the same span
processor when it ends, so batching, export and the encoding are the SDK path's. Anything else (no or malformed
parent, another sampler, limits set) is left to the SDK: ``start`` returns None.

The span is its own ``ReadableSpan``: it keeps the ids as integers and makes its ``SpanContext`` objects only when
someone asks for them, so a span that goes straight to tracing.encoding costs the request path four objects (the
span, its dict, its attributes and events) instead of ten. ``BatchServerSpanProcessor`` queues it without the SDK
processor's sampled check, which is what would make them. tests/tracing/test_server_span.py checks that both paths
export the same span.
"""

from __future__ import annotations

import random
import re
import time
import traceback
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, SpanProcessor, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.semconv.attributes.exception_attributes import (
    EXCEPTION_ESCAPED,
    EXCEPTION_MESSAGE,
    EXCEPTION_STACKTRACE,
    EXCEPTION_TYPE,
)
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util import types

#: W3C trace context, version 00 (what Envoy sends); other versions go to the SDK's own parser.
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_SCALARS = (str, bool, int, float)
#: Status is immutable: every span starts with this one (the SDK's ReadableSpan shares its default the same way).
_UNSET = Status(StatusCode.UNSET)


def applies(sampler: sampling.Sampler, limits: SpanLimits) -> bool:
    """Whether spans made here are what the SDK would make with ``sampler`` and ``limits``: the default
    parent-based always-on sampler and no limit a span of a few short attributes could reach."""
    return (
        sampler is sampling.DEFAULT_ON
        and limits.max_span_attribute_length is None
        and (limits.max_span_attributes or 0) >= 32
        and (limits.max_events or 0) >= 8
        and (limits.max_event_attributes or 0) >= 8
    )


class ServerSpans:
    """Makes SERVER spans that are children of a remote W3C parent. Thread-safe (no shared mutable state)."""

    def __init__(self, resource: Resource, scope: InstrumentationScope, processor: SpanProcessor) -> None:
        self.resource = resource
        self.scope = scope
        self.processor = processor

    def start(self, name: str, headers: Mapping[str, str], attributes: dict[str, types.AnyValue]) -> trace.Span | None:
        """The span for a request with these headers: recording when the parent is sampled, a non-recording
        one when it is not (parent-based sampling drops it), None when only the SDK can tell (no parent, a
        malformed or future-version ``traceparent``, a ``tracestate`` to carry)."""
        header = headers.get("traceparent")
        if header is None or headers.get("tracestate"):
            return None
        match = _TRACEPARENT.fullmatch(header.strip())
        if match is None:
            return None
        trace_hex, parent_hex, flags = match.groups()
        trace_id, parent_id = int(trace_hex, 16), int(parent_hex, 16)
        if not trace_id or not parent_id:
            return None
        if not int(flags, 16) & TraceFlags.SAMPLED:
            return trace.INVALID_SPAN
        return RecordingServerSpan(self, name, trace_id, parent_id, attributes)


class RecordingServerSpan(trace.Span, ReadableSpan):
    """A sampled server span; when it ends it goes to the span processor as the ``ReadableSpan`` it also is.

    Owned by the request that made it (not thread-safe while it records; read-only once ended). The attributes
    given to ``ServerSpans.start`` must be scalars (they are taken as they are); later ones are checked as the SDK
    checks them. ``trace_id``, ``span_id`` and ``parent_span_id`` are the ids as integers (tracing.encoding
    writes them from there).
    """

    # ReadableSpan's fields that are the same for every server span (its properties read these names).
    _kind = SpanKind.SERVER
    _links: tuple[trace.Link, ...] = ()
    _instrumentation_info = None
    _attributes: dict[str, types.AnyValue]
    _events: list[Event]

    def __init__(
        self,
        spans: ServerSpans,
        name: str,
        trace_id: int,
        parent_id: int,
        attributes: dict[str, types.AnyValue],
    ) -> None:
        # ReadableSpan.__init__ is not called: it would only store what is set here (or made lazily below).
        self._processor = spans.processor
        self._resource = spans.resource
        self._instrumentation_scope = spans.scope
        self._name = name
        self.trace_id = trace_id
        self.parent_span_id = parent_id
        span_id = random.getrandbits(64)
        while not span_id:
            span_id = random.getrandbits(64)
        self.span_id = span_id
        self._attributes = attributes
        self._events = []
        self._status = _UNSET
        self._start_time = time.time_ns()
        self._end_time: int | None = None
        self._own_context: SpanContext | None = None
        self._parent_context: SpanContext | None = None

    @property
    def _context(self) -> SpanContext:  # type: ignore[override]
        # ReadableSpan's context, get_span_context() and to_json() all read this name.
        if self._own_context is None:
            self._own_context = SpanContext(self.trace_id, self.span_id, is_remote=False, trace_flags=_SAMPLED)
        return self._own_context

    @property
    def _parent(self) -> SpanContext:  # type: ignore[override]
        if self._parent_context is None:
            self._parent_context = SpanContext(self.trace_id, self.parent_span_id, is_remote=True, trace_flags=_SAMPLED)
        return self._parent_context

    def get_span_context(self) -> SpanContext:
        """This span's context (its own id, the parent's trace id)."""
        return self._context

    def is_recording(self) -> bool:
        """True until the span ends."""
        return self._end_time is None

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        """Set one attribute (ignored once the span has ended)."""
        if self._end_time is not None:
            return
        if type(value) in _SCALARS:
            self._attributes[key] = value
            return
        # Anything but a scalar is kept, converted or dropped (with its warning) as the SDK's span does it.
        cleaned = BoundedAttributes(attributes={key: value}, immutable=False)
        if key in cleaned:
            self._attributes[key] = cleaned[key]

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        """Set several attributes."""
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(self, name: str, attributes: types.Attributes = None, timestamp: int | None = None) -> None:
        """Add an event (its attributes as given)."""
        if self._end_time is None:
            self._events.append(Event(name, BoundedAttributes(attributes=attributes), timestamp))

    def update_name(self, name: str) -> None:
        """Rename the span."""
        if self._end_time is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        """Set the status as the SDK does: UNSET is ignored, and OK is final."""
        if self._end_time is not None or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self._status = status

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        """An ``exception`` event with the attributes the SDK gives it."""
        module = type(exception).__module__
        qualname = type(exception).__qualname__
        event_attributes: dict[str, types.AnyValue] = {
            EXCEPTION_TYPE: f"{module}.{qualname}" if module and module != "builtins" else qualname,
            EXCEPTION_MESSAGE: str(exception),
            EXCEPTION_STACKTRACE: "".join(traceback.format_exception(exception)),
            EXCEPTION_ESCAPED: str(escaped),
        }
        event_attributes.update(attributes or {})
        self.add_event("exception", event_attributes, timestamp)

    def end(self, end_time: int | None = None) -> None:
        """End the span and hand it to the span processor (once)."""
        if self._end_time is not None:
            return
        self._end_time = end_time if end_time is not None else time.time_ns()
        self._processor.on_end(self)


class BatchServerSpanProcessor(BatchSpanProcessor):
    """The SDK's batch span processor, which queues a ``RecordingServerSpan`` without first asking its context
    whether it is sampled (it always is; asking would make the SpanContext the export does without)."""

    def on_end(self, span: ReadableSpan) -> None:
        """Queue ``span`` for export when it is sampled."""
        # _batch_processor is the SDK's (1.33+) shared batching; without it, the SDK's own on_end does the same.
        batch = getattr(self, "_batch_processor", None)
        if type(span) is RecordingServerSpan and batch is not None:
            batch.emit(span)
        else:
            super().on_end(span)
