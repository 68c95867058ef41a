"""The span of one inference, child of the caller's W3C trace context (the sidecar Envoy's span).

Callers fetch ``tracing.active_tracer()`` first and skip all of this when it is None: with tracing off an
inference costs one global lookup and nothing else. With tracing on, the span comes from
tracing.server_span when it can make it (a ``traceparent`` from the sidecar, the default sampler): a few
microseconds of the event loop instead of the SDK tracer's ~35.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AnyValue

from runtimes.errors import InferenceError
from runtimes.messages import InferRequest
from runtimes.tensors import INT64_MAX, INT64_MIN
from tracing.provider import active_server_spans

REQUEST_ID_HEADER = "x-request-id"
#: Envoy's OpenTelemetry tracer speaks W3C trace context (traceparent); nothing else needs extracting.
_W3C = TraceContextTextMapPropagator()


class inference_span:
    """A server span around one inference; errors are recorded on it (status ERROR only for the server's own
    failures: a client's bad request is the client's error, as HTTP semantic conventions have it).

    A class rather than a @contextmanager generator: it runs on every traced request, and the generator's
    machinery costs about as much as making the span itself.
    """

    __slots__ = ("span",)

    def __init__(
        self,
        tracer: trace.Tracer,
        protocol: str,
        headers: Mapping[str, str],
        model: str,
        version: str,
        application: str | None,
    ) -> None:
        attributes: dict[str, AnyValue] = {"hydro.protocol": protocol, "hydro.model": model}
        if version:
            attributes["hydro.version"] = version
        if application:
            attributes["hydro.application"] = application
        request_id = headers.get(REQUEST_ID_HEADER)
        if request_id:
            attributes["hydro.request_id"] = request_id
        name = f"infer {model}"
        server_spans = active_server_spans()
        span = server_spans.start(name, headers, attributes) if server_spans is not None else None
        if span is None:
            # start_span, not start_as_current_span: nothing below makes child spans, and attaching the span to
            # the context (and detaching it) would cost every request for nothing.
            span = tracer.start_span(name, context=_W3C.extract(headers), kind=SpanKind.SERVER, attributes=attributes)
        self.span = span

    def __enter__(self) -> trace.Span:
        return self.span

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        span = self.span
        if isinstance(exc, InferenceError):
            span.record_exception(exc)
            span.set_attribute("hydro.error_status", exc.http_status)
            if exc.http_status >= 500:
                span.set_status(Status(StatusCode.ERROR, str(exc)))
        elif isinstance(exc, Exception):
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        span.end()


def describe_request(span: trace.Span, request: InferRequest) -> None:
    """Attributes known once the request is parsed: batch size (first dimension of the first input), its id.

    Called before the request is checked against the signature, so the batch size is whatever the client wrote;
    one that OTLP's int64 cannot carry is left off (the exporter would only drop it).
    """
    if request.inputs:
        shape = request.inputs[0].shape
        batch_size = shape[0] if shape else 1
        if INT64_MIN <= batch_size <= INT64_MAX:
            span.set_attribute("hydro.batch_size", batch_size)
    if request.id:
        span.set_attribute("hydro.inference_id", request.id)
