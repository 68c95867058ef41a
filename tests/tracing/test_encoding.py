"""tracing.encoding writes the same export requests as the SDK's encoder, for simple and unusual spans alike."""

from __future__ import annotations

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)

from tracing.encoding import encode_spans
from tracing.server_span import RecordingServerSpan, ServerSpans


def _spans() -> list[ReadableSpan]:
    kept = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "enc", "hydro.version": 3}))
    provider.add_span_processor(SimpleSpanProcessor(kept))
    tracer = provider.get_tracer("a")
    remote = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    parent = set_span_in_context(NonRecordingSpan(remote))
    attributes = {"s": "x", "u": "é→", "i": 7, "n": -3, "big": 2**62, "f": 0.5, "b": True, "b0": False}
    tracer.start_span("plain", context=parent, kind=SpanKind.SERVER, attributes=attributes).end()
    tracer.start_span("root").end()
    failed = tracer.start_span("failed", context=parent, kind=SpanKind.CLIENT)
    failed.set_status(Status(StatusCode.ERROR, "boom"))
    failed.end()
    recorded = tracer.start_span("with event")
    recorded.record_exception(ValueError("bad"))
    recorded.end()
    tracer.start_span("with link and list", links=[Link(remote)], attributes={"l": [1, 2]}).end()
    provider.get_tracer("b").start_span("other scope").end()
    return list(kept.get_finished_spans())


def _server_spans() -> list[ReadableSpan]:
    """Spans of tracing.server_span (the runtime's own span class, which the encoder writes from its ints), with
    request ids longer than the encoder's string cache takes, an error status and an event."""
    kept = InMemorySpanExporter()
    spans = ServerSpans(Resource.create({"service.name": "enc"}), InstrumentationScope("s"), SimpleSpanProcessor(kept))
    headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    for request_id in ("r" * 36, "q" * 180, "short"):
        span = spans.start("infer", headers, {"hydro.request_id": request_id, "hydro.batch_size": 1})
        assert isinstance(span, RecordingServerSpan)
        span.end()
    failed = spans.start("infer", headers, {"hydro.request_id": "f" * 40})
    assert failed is not None
    failed.set_status(Status(StatusCode.ERROR, "bad input"))
    failed.end()
    with_event = spans.start("infer", headers, {})
    assert with_event is not None
    with_event.record_exception(ValueError("bad"))
    with_event.end()
    return list(kept.get_finished_spans())


def test_same_request_as_the_sdk() -> None:
    spans = _spans()
    assert encode_spans(spans) == sdk_encode_spans(spans)


def test_same_request_as_the_sdk_for_server_spans() -> None:
    spans = _server_spans()
    assert len(spans) == 5
    assert encode_spans(spans) == sdk_encode_spans(spans)
    # Twice: the second time the encoder's caches are warm.
    assert encode_spans(spans) == sdk_encode_spans(spans)
