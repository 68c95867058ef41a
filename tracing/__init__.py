"""OpenTelemetry for every Hydro Serving process: set-up from OTEL_* variables, spans, Envoy's tracing pieces."""

from tracing.provider import Tracing, active_tracer, setup_tracing
from tracing.settings import CollectorAddress, InvalidEndpoint, TracingSettings, parse_endpoint

__all__ = [
    "CollectorAddress",
    "InvalidEndpoint",
    "Tracing",
    "TracingSettings",
    "active_tracer",
    "parse_endpoint",
    "setup_tracing",
]
