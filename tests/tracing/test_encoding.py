"""tracing.encoding writes the same export requests as the SDK's encoder, for simple and unusual spans alike, and
leaves out what protobuf cannot carry as the SDK does (a bad attribute) or only that span (where the SDK would lose
the whole batch)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
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
from otlp_receiver import OtlpReceiver

from tracing.encoding import _SPAN_IN_SCOPE, FastOTLPSpanExporter, _field, _merge, encode_spans
from tracing.quiet_export import ENCODER_LOGGERS, RateLimitFilter, quiet_export_logging
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


# -- values protobuf cannot carry --------------------------------------------------------------------------------

#: Attribute values the OTLP message cannot hold: ints outside int64 (each range _varint got wrong: a wrapped
#: number, a too-long varint upb still read, one it refused, an error), strings with a lone surrogate (short ones
#: go through the encoder's cache, long ones do not), and a key with one.
BAD_ATTRIBUTES: list[tuple[str, object]] = [
    ("int.2^63", 2**63),
    ("int.2^64", 2**64),
    ("int.2^70", 2**70),
    ("int.-2^63-1", -(2**63) - 1),
    ("int.-2^64-1", -(2**64) - 1),
    ("str.short", "\ud800"),
    ("str.long", "x" * 40 + "\udc80"),
    ("key.\udc80", "fine"),
]
#: The int64 limits themselves are kept.
EDGE_ATTRIBUTES = {"int.max": 2**63 - 1, "int.min": -(2**63)}


def _sdk_spans_with(attributes: list[tuple[str, object]]) -> list[ReadableSpan]:
    """An SDK span per bad attribute (beside good ones and the int64 limits), then the same with an event (which
    the encoder hands to the SDK's encoder), each between spans with nothing wrong."""
    kept = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "enc"}))
    provider.add_span_processor(SimpleSpanProcessor(kept))
    tracer = provider.get_tracer("a")
    for event in (False, True):
        for key, value in attributes:
            tracer.start_span("good before", attributes={"n": 1}).end()
            span = tracer.start_span(f"bad {key!a}", attributes={"s": "x", key: value, **EDGE_ATTRIBUTES, "i": 7})
            if event:
                span.add_event("happened")
            span.end()
        tracer.start_span("good after").end()
    return list(kept.get_finished_spans())


def _server_spans_with(attributes: list[tuple[str, object]]) -> list[ReadableSpan]:
    """The runtime's server spans, one per bad attribute (as ServerSpans.start takes it, and set later), each
    after a good one."""
    kept = InMemorySpanExporter()
    spans = ServerSpans(Resource.create({"service.name": "enc"}), InstrumentationScope("s"), SimpleSpanProcessor(kept))
    headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    for key, value in attributes:
        good = spans.start("good", headers, {"hydro.request_id": "r" * 36})
        assert good is not None
        good.end()
        at_start = spans.start("bad at start", headers, {"hydro.model": "m", key: value})  # type: ignore[dict-item]
        assert at_start is not None
        at_start.end()
        later = spans.start("bad later", headers, {"hydro.model": "m"})
        assert later is not None
        later.set_attribute(key, value)  # type: ignore[arg-type]
        later.set_attribute("hydro.batch_size", 3)
        later.end()
    return list(kept.get_finished_spans())


def _attribute_keys(request: ExportTraceServiceRequest) -> list[list[str]]:
    return [
        [a.key for a in span.attributes]
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]


@pytest.fixture
def unfiltered_encoder_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The encoders' loggers without the rate limit another test's set-up may have left on them."""
    for name in ENCODER_LOGGERS:
        monkeypatch.setattr(logging.getLogger(name), "filters", [])


@pytest.mark.usefixtures("unfiltered_encoder_logs")
@pytest.mark.parametrize("make", [_sdk_spans_with, _server_spans_with])
def test_attributes_protobuf_cannot_carry_are_left_out_as_the_sdk_leaves_them(
    make: Callable[[list[tuple[str, object]]], list[ReadableSpan]], caplog: pytest.LogCaptureFixture
) -> None:
    spans = make(BAD_ATTRIBUTES)
    expected = sdk_encode_spans(spans)
    bad_keys = {key for key, _ in BAD_ATTRIBUTES}
    # Every span is there, without its bad attribute and with everything else.
    assert sum(len(scope.spans) for resource in expected.resource_spans for scope in resource.scope_spans) == len(spans)
    assert not bad_keys & {key for keys in _attribute_keys(expected) for key in keys}
    with caplog.at_level(logging.WARNING):
        assert encode_spans(spans) == expected
        # Again with the encoder's caches warm: a bad value is never cached.
        assert encode_spans(spans) == expected
    ours = [r for r in caplog.records if r.name == "tracing.encoding"]
    assert ours, "nothing logged"
    assert all("left out of the export" in r.getMessage() for r in ours)
    if make is _server_spans_with:
        # The server spans are all written by our encoder: each bad attribute is named, with its span.
        messages = "\n".join(r.getMessage() for r in ours)
        for key, _ in BAD_ATTRIBUTES:
            assert f"attribute {key!r} of span 'bad at start'" in messages


def _spans_named(provider_spans: list[ReadableSpan], *names: str) -> list[ReadableSpan]:
    return [span for span in provider_spans if span.name in names]


@pytest.mark.usefixtures("unfiltered_encoder_logs")
def test_a_span_protobuf_cannot_carry_costs_only_itself(caplog: pytest.LogCaptureFixture) -> None:
    """A lone surrogate in a span's name or status message fails the SDK's whole batch; ours leaves that span out."""
    kept = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "enc"}))
    provider.add_span_processor(SimpleSpanProcessor(kept))
    tracer = provider.get_tracer("a")
    tracer.start_span("good 1", attributes={"i": 1}).end()
    tracer.start_span("name \ud800").end()
    failed = tracer.start_span("bad status")
    failed.set_status(Status(StatusCode.ERROR, "message \udc80"))
    failed.end()
    tracer.start_span("good 2").end()
    with_event = tracer.start_span("event \ud800")
    with_event.add_event("happened")
    with_event.end()
    # The only span of its scope: no empty scope is left behind.
    provider.get_tracer("alone").start_span("alone \ud800").end()
    tracer.start_span("good 3").end()
    headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    server_spans = ServerSpans(provider.resource, InstrumentationScope("s"), SimpleSpanProcessor(kept))
    for name in ("server good", "server \ud800"):
        span = server_spans.start(name, headers, {"hydro.model": "m"})
        assert span is not None
        span.end()
    spans = list(kept.get_finished_spans())
    with pytest.raises(UnicodeEncodeError):
        sdk_encode_spans(spans)
    good = _spans_named(spans, "good 1", "good 2", "good 3", "server good")
    with caplog.at_level(logging.WARNING):
        assert encode_spans(spans) == sdk_encode_spans(good)
    messages = [r.getMessage() for r in caplog.records if r.name == "tracing.encoding"]
    assert len(messages) == 5, messages
    assert any("span 'name \\ud800' left out of the export: UnicodeEncodeError" in m for m in messages), messages
    assert any("span 'bad status' left out" in m for m in messages), messages


def test_the_other_spans_of_the_batch_are_exported(receiver: OtlpReceiver) -> None:
    """Through the OTLP exporter to a collector: the batch goes out without the spans it cannot carry."""
    spans = _sdk_spans_with(BAD_ATTRIBUTES) + _server_spans_with(BAD_ATTRIBUTES)
    kept = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "enc"}))
    provider.add_span_processor(SimpleSpanProcessor(kept))
    provider.get_tracer("a").start_span("lost \ud800").end()
    spans += kept.get_finished_spans()
    receiver.clear()
    exporter = FastOTLPSpanExporter(endpoint=receiver.endpoint, insecure=True)
    try:
        assert exporter.export(spans) is SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()
    received = receiver.spans()
    assert sorted(s.name for s in received) == sorted(s.name for s in spans if s.name != "lost \ud800")
    bad_keys = {key for key, _ in BAD_ATTRIBUTES}
    assert not any(bad_keys & set(s.attributes) for s in received)
    assert all(s.attributes["int.max"] == 2**63 - 1 for s in received if s.name.startswith("bad 'int."))


def test_left_out_values_are_logged_within_the_export_rate_limit(caplog: pytest.LogCaptureFixture) -> None:
    """Once a process quiets its export logging, the encoders' messages (ours and the SDK's, which logs a
    traceback per attribute it leaves out) share one rate limit of their own."""
    exporter_filter = quiet_export_logging()
    filters = [
        [f for f in logging.getLogger(name).filters if isinstance(f, RateLimitFilter)] for name in ENCODER_LOGGERS
    ]
    assert [len(found) for found in filters] == [1, 1]
    shared = filters[0][0]
    assert filters[1][0] is shared and shared is not exporter_filter
    # Sixteen bad attributes, half of them in spans the SDK's encoder writes: one message at most gets through.
    with caplog.at_level(logging.WARNING):
        encode_spans(_sdk_spans_with(BAD_ATTRIBUTES))
    assert len([r for r in caplog.records if r.name in ENCODER_LOGGERS]) <= 1
    assert shared.suppressed >= len(BAD_ATTRIBUTES) * 2 - 1


def test_a_span_the_writer_got_wrong_costs_only_itself(caplog: pytest.LogCaptureFixture) -> None:
    """The merge of written spans, should the writer ever write bytes protobuf refuses (as it did for big ints)."""
    good = _field(_SPAN_IN_SCOPE, _field(b"\x2a", b"good"))  # Span.name
    cut_short = _field(_SPAN_IN_SCOPE, b"\x39\x00\x00")  # Span.start_time_unix_nano, 2 of its 8 bytes
    scope = trace_pb2.ScopeSpans()
    scope.spans.add(name="before")
    _merge(scope, [good, cut_short, good])
    assert [span.name for span in scope.spans] == ["before", "good", "good"]
