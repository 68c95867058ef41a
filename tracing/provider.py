"""``setup_tracing``: the one OpenTelemetry set-up of every Hydro Serving process.

Runtimes, xds_control and manager_api call it once at start-up with the name they go by in Jaeger. With no
collector configured it installs nothing and ``active_tracer()`` stays None: instrumented code checks that one
global and does no tracing work at all. The same holds while a configured collector does not answer
(tracing.collector_watch).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from tracing.collector_watch import PROBE_INTERVAL_SECONDS, CollectorWatch, WatchedExporter, tls_credentials
from tracing.encoding import FastOTLPSpanExporter
from tracing.quiet_export import quiet_export_logging
from tracing.server_span import BatchServerSpanProcessor, ServerSpans, applies
from tracing.settings import CollectorAddress, InvalidEndpoint, TracingSettings

log = logging.getLogger(__name__)

INSTRUMENTATION_NAME = "hydro_serving"


@dataclass
class Tracing:
    """The tracing state of this process: a tracer when spans are exported, None when tracing is off."""

    settings: TracingSettings
    service_name: str
    tracer: trace.Tracer | None = None
    provider: TracerProvider | None = field(default=None, repr=False)
    exporter: OTLPSpanExporter | None = field(default=None, repr=False)
    #: Hands the tracer out only while the collector answers (tracing.collector_watch).
    watch: CollectorWatch | None = field(default=None, repr=False)
    #: The cheap maker of server spans under a remote parent, when the sampler and limits allow it.
    server_spans: ServerSpans | None = field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        """Whether spans are being made right now."""
        return self.tracer is not None

    @property
    def configured(self) -> bool:
        """Whether spans are exported when the collector answers (``enabled`` says whether it does now)."""
        return self.provider is not None

    def shutdown(self, timeout_seconds: float = 2.0) -> None:
        """Export what is queued, waiting at most ``timeout_seconds``: a dead collector must not hold up an exit.

        The SDK's own shutdown waits for an export in progress, and an export to a collector that is down retries
        for up to OTEL_EXPORTER_OTLP_TIMEOUT (10 s): it runs on a thread of its own, and past the timeout the
        exporter is told to stop retrying.
        """
        global _active
        self.tracer = None
        self.server_spans = None
        if _active is self:
            _active = None
        provider, exporter, self.provider, self.exporter = self.provider, self.exporter, None, None
        if self.watch is not None:
            self.watch.stop()
        if provider is None:
            return
        flushing = threading.Thread(target=provider.shutdown, name="tracing-shutdown", daemon=True)
        flushing.start()
        flushing.join(timeout_seconds)
        if flushing.is_alive() and exporter is not None:
            exporter.shutdown()
            flushing.join(0.5)


_active: Tracing | None = None


def exporter_channel_options() -> tuple[tuple[str, int], ...]:
    """gRPC options of the exporter's channel: reconnect back-off capped at the probe interval.

    gRPC's default cap is 120 s: after a long outage the exporter's channel may wait that long before its next
    connection attempt while the probe (a fresh channel) already found the collector up and resumed tracing, so
    the first exports fail, pause tracing again, and the spans made in between are dropped.
    """
    return (("grpc.max_reconnect_backoff_ms", int(PROBE_INTERVAL_SECONDS * 1000)),)


def active_tracer() -> trace.Tracer | None:
    """The tracer of this process, None when tracing is off or paused (the one check on hot paths)."""
    return _active.tracer if _active is not None else None


def active_server_spans() -> ServerSpans | None:
    """The maker of server spans under a W3C parent (tracing.server_span), None when spans must come from the
    tracer. Only meaningful while ``active_tracer()`` is not None."""
    return _active.server_spans if _active is not None else None


def _exporter_credentials(collector: CollectorAddress) -> grpc.ChannelCredentials | None:
    if not collector.secure:
        return None
    try:
        return tls_credentials(collector)
    except OSError as exc:
        raise InvalidEndpoint(f"the collector's CA file cannot be read: {exc}") from exc


def setup_tracing(
    service_name: str,
    *,
    attributes: Mapping[str, str | int] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Tracing:
    """Configure tracing for this process from the OTEL_* environment variables (see tracing.settings).

    ``service_name`` is how the process shows in Jaeger (``OTEL_SERVICE_NAME`` overrides it); ``attributes`` are
    added to its resource (``OTEL_RESOURCE_ATTRIBUTES`` is read too). Spans go through a BatchSpanProcessor to an
    OTLP gRPC exporter, so a slow or absent collector costs the request path only a queue append. Calling it again
    replaces the previous set-up. Raises tracing.settings.InvalidEndpoint for an unusable endpoint.
    """
    global _active
    if _active is not None:
        _active.shutdown()
    settings = TracingSettings.from_environ(environ)
    name = settings.service_name or service_name
    state = Tracing(settings, name)
    if settings.collector is None:
        _active = state
        return state
    quiet_export_logging()
    resource = Resource.create({**(attributes or {}), SERVICE_NAME: name})
    # The sampler comes from OTEL_TRACES_SAMPLER(_ARG); the SDK's default, parent-based always-on, follows the
    # decision of the caller (the Envoy in front), so Envoy's sampling percentage decides for the whole trace.
    provider = TracerProvider(resource=resource)
    exporter = FastOTLPSpanExporter(
        endpoint=settings.collector.url,
        insecure=not settings.collector.secure,
        credentials=_exporter_credentials(settings.collector),
        # The SDK annotates the values as str; gRPC takes this option as an int (a str one it would ignore).
        channel_options=exporter_channel_options(),  # type: ignore[arg-type]
    )
    tracer = provider.get_tracer(INSTRUMENTATION_NAME)

    def armed(reachable: bool) -> None:
        # One reference assignment: hot paths read state.tracer without a lock.
        state.tracer = tracer if reachable and state.provider is not None else None

    watch = CollectorWatch(settings.collector, armed)
    processor = BatchServerSpanProcessor(WatchedExporter(exporter, watch))
    provider.add_span_processor(processor)
    if applies(provider.sampler, SpanLimits()):
        state.server_spans = ServerSpans(resource, InstrumentationScope(INSTRUMENTATION_NAME), processor)
    state.provider = provider
    state.exporter = exporter
    # Armed until the first probe (milliseconds on a LAN) says the collector does not answer.
    state.tracer = tracer
    state.watch = watch.start()
    _active = state
    log.info("tracing: spans of %r go to the OTLP collector at %s", name, settings.collector)
    return state
