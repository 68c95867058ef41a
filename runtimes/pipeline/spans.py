"""The pipeline runtime's spans: one server span per request, a client span per stage call and per shadow call.

The request span is the child of the ``traceparent`` the pipeline's sidecar sends and is made current, so the
stage spans started under it become its children. Shadow calls are made by the shadow worker process: the runtime
hands it the request's trace headers (:func:`propagation_headers`) and the worker starts each shadow span under
them (:func:`remote_parent`), so those are the request span's children too. Every stage and shadow call carries its
own span's ``traceparent`` and the request's ``x-request-id`` (when gRPC takes it: :func:`grpc_metadata`) in its
metadata: the sidecar's outbound listener and the stage's sidecar and runtime then join the same trace, and Envoy
keeps the ingress's sampling decision (which it holds in the request id).

Callers fetch ``tracing.provider.active_tracer()`` first and skip all of this when it is None.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from runtimes.errors import InferenceError
from runtimes.spans import REQUEST_ID_HEADER

Metadata = tuple[tuple[str, str], ...]

_W3C = TraceContextTextMapPropagator()
#: The x-request-id of the request being served, passed on to its stage and shadow calls.
_request_id: ContextVar[str | None] = ContextVar("hydro_pipeline_request_id", default=None)


def invocation_headers(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """A gRPC call's text metadata, as the propagator reads headers."""
    return {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}


def _record_error(span: trace.Span, exc: BaseException) -> None:
    # As runtimes.spans: a caller's bad request is the caller's error, only server faults set the status.
    span.record_exception(exc)
    if isinstance(exc, InferenceError):
        span.set_attribute("hydro.error_status", exc.http_status)
        if exc.http_status < 500:
            return
        span.set_status(Status(StatusCode.ERROR, str(exc)))
    else:
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


@contextmanager
def request_span(
    tracer: trace.Tracer, protocol: str, headers: Mapping[str, str], application: str
) -> Iterator[trace.Span]:
    """The server span of one pipeline request, current while the block runs; errors are recorded on it."""
    attributes: dict[str, str] = {"hydro.protocol": protocol, "hydro.application": application}
    request_id = headers.get(REQUEST_ID_HEADER)
    if request_id:
        attributes["hydro.request_id"] = request_id
    span = tracer.start_span(
        f"pipeline {application}", context=_W3C.extract(headers), kind=SpanKind.SERVER, attributes=attributes
    )
    token = _request_id.set(request_id)
    try:
        with trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
            yield span
    except BaseException as exc:
        _record_error(span, exc)
        raise
    finally:
        _request_id.reset(token)
        span.end()


@contextmanager
def call_span(
    tracer: trace.Tracer, name: str, attributes: Mapping[str, str | int], parent: Context | None = None
) -> Iterator[trace.Span]:
    """A client span for one outbound call (a stage or a shadow), child of ``parent`` or of the current span."""
    span = tracer.start_span(name, context=parent, kind=SpanKind.CLIENT, attributes=attributes)
    try:
        yield span
    except BaseException as exc:
        _record_error(span, exc)
        raise
    finally:
        span.end()


def stage_span(tracer: trace.Tracer, application: str, stage: int) -> AbstractContextManager[trace.Span]:
    """The span of calling stage ``stage`` (1-based); the caller adds ``hydro.variant`` once it is known."""
    return call_span(tracer, f"stage {stage}", {"hydro.application": application, "hydro.stage": stage})


def shadow_span(
    tracer: trace.Tracer, application: str, stage: int, shadow: str, parent: Context
) -> AbstractContextManager[trace.Span]:
    """The span of one shadow call of stage ``stage`` to ``shadow`` ("model:version"), under the request's span."""
    attributes: dict[str, str | int] = {"hydro.application": application, "hydro.stage": stage, "hydro.shadow": shadow}
    return call_span(tracer, f"shadow {stage} {shadow}", attributes, parent)


def record_outcome(span: trace.Span, outcome: str) -> None:
    """A shadow call's outcome (agree, disagree, error); an error is a fault of the shadow variant."""
    span.set_attribute("hydro.shadow_outcome", outcome)
    if outcome == "error":
        span.set_status(Status(StatusCode.ERROR, "the shadow call failed"))


def grpc_metadata(headers: Mapping[str, str]) -> Metadata:
    """``headers`` as gRPC metadata, leaving out the values gRPC would refuse: it takes printable ASCII only.

    gRPC refuses a whole call with any other value, and not with a status but with an exception of its own
    (ExecuteBatchError). Starlette decodes header bytes as latin-1, so a caller's ``x-request-id`` can hold
    anything; such an id is dropped rather than mangled (the sidecar then gives the call an id of its own).
    """
    return tuple((key, value) for key, value in headers.items() if value.isascii() and value.isprintable())


def trace_metadata(span: trace.Span, request_id: str | None = None) -> Metadata:
    """gRPC metadata that makes ``span`` the parent of whatever serves the call, plus the request's id (by default
    the one of the request being served) when gRPC takes it as a metadata value."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, context=trace.set_span_in_context(span))
    request_id = request_id or _request_id.get()
    if request_id:
        carrier[REQUEST_ID_HEADER] = request_id
    return grpc_metadata(carrier)


def propagation_headers() -> dict[str, str]:
    """The current span's W3C headers and the request's id: what the shadow worker needs to join the trace."""
    return dict(trace_metadata(trace.get_current_span()))


def remote_parent(headers: Mapping[str, str]) -> Context | None:
    """The parent context ``propagation_headers`` describes; None without a valid ``traceparent``."""
    context = _W3C.extract(headers)
    if not trace.get_current_span(context).get_span_context().is_valid:
        return None
    return context
