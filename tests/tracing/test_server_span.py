"""tracing.server_span makes the span the SDK's tracer would make for the runtime's inference, and declines (for
the SDK to decide) whatever it cannot make the same way."""

from __future__ import annotations

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider, sampling
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from otlp_receiver import OtlpReceiver

from manager_api.ports import free_port
from manager_api.processes import wait_until
from tracing.encoding import encode_spans
from tracing.provider import INSTRUMENTATION_NAME, active_tracer, setup_tracing
from tracing.server_span import ServerSpans, applies

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"
SAMPLED = {"traceparent": f"00-{TRACE}-{PARENT}-01", "x-request-id": "r-1"}


def _pair() -> tuple[ServerSpans, TracerProvider, InMemorySpanExporter]:
    kept = InMemorySpanExporter()
    resource = Resource.create({"service.name": "server-span"})
    processor = SimpleSpanProcessor(kept)
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(processor)
    return ServerSpans(resource, InstrumentationScope(INSTRUMENTATION_NAME), processor), provider, kept


def _exercise(span: Span, failure: Exception | None) -> None:
    span.set_attribute("hydro.batch_size", 3)
    span.set_attribute("hydro.shape", [3, 4])
    span.set_attribute("ignored", [1, "mixed"])
    if failure is not None:
        span.record_exception(failure)
        span.set_status(Status(StatusCode.ERROR, str(failure)))
        span.set_status(Status(StatusCode.UNSET))
    span.end()
    span.set_attribute("after.end", 1)


def _normalized(spans: list[ReadableSpan]) -> ExportTraceServiceRequest:
    """The SDK's encoding with what differs between any two spans (own id, times) blanked."""
    request = sdk_encode_spans(spans)
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                span.span_id = b""
                span.start_time_unix_nano = span.end_time_unix_nano = 0
                for event in span.events:
                    event.time_unix_nano = 0
    return request


@pytest.mark.parametrize("failure", [None, ValueError("bad input")], ids=["ok", "exception"])
def test_same_span_as_the_sdk(failure: Exception | None) -> None:
    spans, provider, kept = _pair()
    attributes = {"hydro.model": "iris", "hydro.request_id": "r-1"}
    fast = spans.start("infer iris", SAMPLED, dict(attributes))
    assert fast is not None and fast.is_recording()
    _exercise(fast, failure)
    parent = TraceContextTextMapPropagator().extract(SAMPLED)
    tracer = provider.get_tracer(INSTRUMENTATION_NAME)
    _exercise(tracer.start_span("infer iris", context=parent, kind=SpanKind.SERVER, attributes=attributes), failure)
    fast_span, sdk_span = kept.get_finished_spans()
    assert _normalized([fast_span]) == _normalized([sdk_span])
    assert fast_span.parent is not None and fast_span.parent.is_remote
    assert f"{fast_span.context.trace_id:032x}" == TRACE and f"{fast_span.parent.span_id:016x}" == PARENT
    assert fast_span.context.span_id not in (0, sdk_span.context.span_id)
    assert fast_span.start_time is not None and fast_span.end_time is not None
    assert fast_span.start_time <= fast_span.end_time
    # And our own encoder writes it as the SDK's does.
    assert encode_spans([fast_span]) == sdk_encode_spans([fast_span])


def test_unsampled_parent_makes_no_span() -> None:
    spans, _, kept = _pair()
    span = spans.start("infer iris", {"traceparent": f"00-{TRACE}-{PARENT}-00"}, {})
    assert span is INVALID_SPAN and not span.is_recording()
    span.end()
    assert kept.get_finished_spans() == ()


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"traceparent": "garbage"},
        {"traceparent": f"00-{'0' * 32}-{PARENT}-01"},
        {"traceparent": f"01-{TRACE}-{PARENT}-01-future"},
        {"traceparent": f"00-{TRACE}-{PARENT}-01", "tracestate": "vendor=1"},
    ],
    ids=["no parent", "malformed", "zero trace id", "other version", "trace state"],
)
def test_leaves_to_the_sdk_what_it_cannot_make_the_same_way(headers: dict[str, str]) -> None:
    spans, _, _ = _pair()
    assert spans.start("infer iris", headers, {}) is None


def test_only_with_the_default_sampler_and_limits() -> None:
    assert applies(sampling.DEFAULT_ON, SpanLimits())
    assert not applies(sampling.ALWAYS_ON, SpanLimits())
    assert not applies(sampling.ParentBasedTraceIdRatio(0.5), SpanLimits())
    assert not applies(sampling.DEFAULT_ON, SpanLimits(max_span_attribute_length=8))
    assert not applies(sampling.DEFAULT_ON, SpanLimits(max_span_attributes=4))


def test_setup_tracing_hands_out_server_spans_only_when_they_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    tracing = setup_tracing("unit", environ=environ)
    try:
        assert tracing.server_spans is not None
    finally:
        tracing.shutdown(timeout_seconds=0.5)
    assert tracing.server_spans is None, "shut down: nothing is handed out"
    # The SDK reads the sampler from the process environment.
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    tracing = setup_tracing("unit", environ=environ)
    try:
        assert tracing.server_spans is None
    finally:
        tracing.shutdown(timeout_seconds=0.5)


def test_server_spans_reach_a_live_collector(receiver: OtlpReceiver) -> None:
    receiver.clear()
    tracing = setup_tracing("unit", environ={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{receiver.endpoint}"})
    try:
        wait_until(lambda: active_tracer() is not None, 10, "the collector probe to arm the tracer")
        assert tracing.server_spans is not None
        span = tracing.server_spans.start("fast one", SAMPLED, {"hydro.model": "iris"})
        assert span is not None
        span.end()
    finally:
        tracing.shutdown()
    (received,) = receiver.wait_for(lambda spans: any(s.name == "fast one" for s in spans), 10, "the span")
    assert received.trace_id == TRACE and received.parent_id == PARENT
    assert received.attributes["hydro.model"] == "iris"
