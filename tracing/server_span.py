"""Server spans under a W3C ``traceparent``, made without the SDK's general span machinery.

Every traced inference makes one server span whose parent is the sidecar Envoy's span. Through the SDK's
``Tracer.start_span`` that costs ~35 us of the event loop's time (context extraction, the sampler, attribute
validation through ABC checks, two lock-guarded attribute writes, a ReadableSpan copy at the end) for what is a
handful of scalars. ``ServerSpans`` makes the same span for the common case - a valid ``traceparent``, no
``tracestate``, the SDK's default parent-based sampler, default span limits - and hands the finished
``ReadableSpan`` to the same span processor, so batching, export and the encoding are the SDK path's. Anything
else (no or malformed parent, another sampler, limits set) is left to the SDK: ``start`` returns None.
tests/tracing/test_server_span.py checks that both paths export the same span.
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


class RecordingServerSpan(trace.Span):
    """A sampled server span; on ``end`` it becomes a ReadableSpan for the span processor.

    Owned by the request that made it (not thread-safe). The attributes given to ``ServerSpans.start`` must be
    scalars (they are taken as they are); later ones are checked as the SDK checks them.
    """

    def __init__(
        self,
        spans: ServerSpans,
        name: str,
        trace_id: int,
        parent_id: int,
        attributes: dict[str, types.AnyValue],
    ) -> None:
        self._spans = spans
        self._name = name
        self._parent = SpanContext(trace_id, parent_id, is_remote=True, trace_flags=_SAMPLED)
        span_id = random.getrandbits(64)
        while not span_id:
            span_id = random.getrandbits(64)
        self._context = SpanContext(trace_id, span_id, is_remote=False, trace_flags=_SAMPLED)
        self._attributes = attributes
        self._events: list[Event] = []
        self._status = Status(StatusCode.UNSET)
        self._start = time.time_ns()
        self._end: int | None = None

    def get_span_context(self) -> SpanContext:
        """This span's context (its own id, the parent's trace id)."""
        return self._context

    def is_recording(self) -> bool:
        """True until the span ends."""
        return self._end is None

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        """Set one attribute (ignored once the span has ended)."""
        if self._end is not None:
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
        if self._end is None:
            self._events.append(Event(name, BoundedAttributes(attributes=attributes), timestamp))

    def update_name(self, name: str) -> None:
        """Rename the span."""
        if self._end is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        """Set the status as the SDK does: UNSET is ignored, and OK is final."""
        if self._end is not None or self._status.status_code is StatusCode.OK:
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
        """End the span and queue it for export (once)."""
        if self._end is not None:
            return
        self._end = end_time if end_time is not None else time.time_ns()
        spans = self._spans
        finished = ReadableSpan(
            name=self._name,
            context=self._context,
            parent=self._parent,
            resource=spans.resource,
            attributes=self._attributes,
            events=tuple(self._events),
            kind=SpanKind.SERVER,
            status=self._status,
            start_time=self._start,
            end_time=self._end,
            instrumentation_scope=spans.scope,
        )
        spans.processor.on_end(finished)
