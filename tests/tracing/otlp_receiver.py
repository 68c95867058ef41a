"""An OTLP gRPC trace receiver in the test process: what Jaeger would get, as plain records to assert on."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from aio_server_thread import AioServerThread
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from manager_api.processes import ReadinessTimeout, wait_until


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind in ("string_value", "bool_value", "int_value", "double_value") else None


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as the collector received it."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict[str, Any] = field(hash=False)
    error: bool = False
    #: The names of the span's events ("exception" for a recorded error).
    events: tuple[str, ...] = ()

    @property
    def is_server(self) -> bool:
        return self.kind == trace_pb2.Span.SPAN_KIND_SERVER

    @property
    def is_client(self) -> bool:
        return self.kind == trace_pb2.Span.SPAN_KIND_CLIENT


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        spans = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            service = str(resource.get("service.name", ""))
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    spans.append(
                        ReceivedSpan(
                            service=service,
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            error=span.status.code == trace_pb2.Status.STATUS_CODE_ERROR,
                            events=tuple(event.name for event in span.events),
                        )
                    )
        self.receiver.add(spans)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """opentelemetry.proto.collector.trace.v1.TraceService on a grpc.aio server, on a loop of its own thread."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self._serving = AioServerThread("otlp-receiver")

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def add(self, spans: list[ReceivedSpan]) -> None:
        with self._lock:
            self._spans.extend(spans)

    def spans(self, trace_id: str | None = None) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self._spans if trace_id is None or s.trace_id == trace_id]

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()

    def wait_for(self, done: Callable[[list[ReceivedSpan]], bool], timeout: float, what: str) -> list[ReceivedSpan]:
        """Poll until ``done(spans)`` holds (Envoy and the SDK export in batches, every few seconds)."""
        try:
            wait_until(lambda: done(self.spans()), timeout, what, interval=0.1)
        except ReadinessTimeout:
            spans = self.spans()
            raise AssertionError(f"timed out waiting for {what}; received {len(spans)} spans: {spans}") from None
        return self.spans()

    def start(self, port: int = 0) -> OtlpReceiver:
        self.port = self._serving.start(lambda server: self._bind(server, port))
        return self

    def _bind(self, server: grpc.aio.Server, port: int) -> int:
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Collector(self), server)
        return server.add_insecure_port(f"{self.host}:{port}")

    def stop(self) -> None:
        self._serving.stop()
