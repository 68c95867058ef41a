"""runtimes.spans.describe_request: what a request puts on its span before it is checked against the signature."""

from __future__ import annotations

import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from runtimes.messages import ArrayData, InferRequest, RequestInput
from runtimes.spans import describe_request


def _described(shape: tuple[int, ...], request_id: str = "") -> dict[str, object]:
    kept = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(kept))
    span = provider.get_tracer("t").start_span("infer")
    tensor = RequestInput("x", "FP32", shape, ArrayData(np.zeros(0, dtype=np.float32)))
    describe_request(span, InferRequest("m", "1", [tensor], id=request_id))
    span.end()
    (finished,) = kept.get_finished_spans()
    return dict(finished.attributes or {})


@pytest.mark.parametrize(
    ("shape", "batch_size"),
    [((3, 4), 3), ((), 1), ((2**63 - 1,), 2**63 - 1), ((-(2**63), 1), -(2**63)), ((0,), 0)],
)
def test_batch_size_is_the_first_dimension(shape: tuple[int, ...], batch_size: int) -> None:
    assert _described(shape, "req-1") == {"hydro.batch_size": batch_size, "hydro.inference_id": "req-1"}


@pytest.mark.parametrize("first", [2**63, 2**64, 2**70, -(2**63) - 1])
def test_a_first_dimension_outside_int64_is_left_off(first: int) -> None:
    """OTLP carries int64 only (the request itself is refused: REST at parsing, gRPC cannot even send one)."""
    assert _described((first, 4), "req-1") == {"hydro.inference_id": "req-1"}
