"""Envoy's OpenTelemetry tracer, as xds_control configures it on the ingress and on every sidecar.

Each HTTP connection manager gets a ``tracing`` block: the ``envoy.tracers.opentelemetry`` provider sending OTLP
over gRPC to the collector cluster and a service name saying which proxy it is. On the ingress
``spawn_upstream_span`` makes every upstream attempt (each retry included) a span of its own under its server span;
a sidecar's server span is the runtime span's parent. The ingress decides sampling (a random percentage);
sidecars sample nothing themselves and follow the decision carried by ``x-request-id`` and ``traceparent``. The
ingress also answers with the trace id (``x-hydro-trace-id``) next to ``x-request-id``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2 as core_base_pb2
from envoy.config.core.v3 import grpc_service_pb2
from envoy.config.trace.v3 import http_tracer_pb2, opentelemetry_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import duration_pb2
from google.protobuf.message import Message

from tracing.settings import SYSTEM_CA_BUNDLE, CollectorAddress, parse_endpoint
from xds_control.resources.clusters import static_cluster
from xds_control.resources.type_urls import pack

COLLECTOR_CLUSTER = "otel|collector"
TRACE_ID_HEADER = "x-hydro-trace-id"
INGRESS_SERVICE = "ingress"
#: Most an export to the collector may take before Envoy drops that batch of spans.
EXPORT_TIMEOUT_SECONDS = 0.5
TLS_TRANSPORT_SOCKET = "envoy.transport_sockets.tls"


def sidecar_service(model: str, version: str) -> str:
    """How a model version's sidecars show in Jaeger."""
    return f"sidecar {model}:{version}"


@dataclass(frozen=True)
class EnvoyTracing:
    """Where Envoys send spans and which share of requests the ingress samples."""

    collector: CollectorAddress
    sampling_percent: float = 100.0

    def __post_init__(self) -> None:
        if not 0 <= self.sampling_percent <= 100:
            raise ValueError(f"the sampling percentage must be between 0 and 100, not {self.sampling_percent}")

    @classmethod
    def from_endpoint(cls, endpoint: str, sampling_percent: float = 100.0) -> EnvoyTracing:
        """From ``HOST:PORT`` or ``http://HOST:PORT`` (tracing.settings.InvalidEndpoint if it is neither)."""
        return cls(parse_endpoint(endpoint), sampling_percent)

    def connection_manager_tracing(self, service_name: str, *, ingress: bool) -> hcm_pb2.HttpConnectionManager.Tracing:
        """The HCM ``tracing`` block. The ingress samples and makes a span per upstream attempt. A sidecar samples
        nothing of its own: it traces what its caller traced (the sampling state Envoy keeps in ``x-request-id``,
        then the ``traceparent`` flag), so health checks and calls without trace context make no traces; its
        server span is the runtime's parent (its one upstream, on loopback, would only add a span per request)."""
        provider = opentelemetry_pb2.OpenTelemetryConfig(
            grpc_service=grpc_service_pb2.GrpcService(
                envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=COLLECTOR_CLUSTER),
                timeout=duration_pb2.Duration(nanos=int(EXPORT_TIMEOUT_SECONDS * 1e9)),
            ),
            service_name=service_name,
        )
        percent = self.sampling_percent if ingress else 0.0
        return hcm_pb2.HttpConnectionManager.Tracing(
            provider=http_tracer_pb2.Tracing.Http(name="envoy.tracers.opentelemetry", typed_config=pack(provider)),
            random_sampling=percent_pb2.Percent(value=percent),
            spawn_upstream_span={"value": ingress},
            # Envoy's default names every server span "ingress" (the traffic direction), sidecars' too.
            operation=f"{service_name} %REQ(:PATH)%",
        )

    def collector_cluster(self) -> cluster_pb2.Cluster:
        """The collector as an HTTP/2 cluster (STRICT_DNS for a host name such as compose's ``jaeger``), over TLS
        for an ``https://`` collector (``collector_tls``)."""
        cluster = static_cluster(COLLECTOR_CLUSTER, self.collector.host, self.collector.port, http2=True)
        if not _is_ip(self.collector.host):
            cluster.type = cluster_pb2.Cluster.STRICT_DNS
        if self.collector.secure:
            cluster.transport_socket.CopyFrom(
                core_base_pb2.TransportSocket(
                    name=TLS_TRANSPORT_SOCKET, typed_config=pack(collector_tls(self.collector))
                )
            )
        return cluster


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def collector_tls(collector: CollectorAddress) -> tls_pb2.UpstreamTlsContext:
    """TLS to the collector as the runtimes' exporters speak it: the certificate checked against the collector's
    CA file (``OTEL_EXPORTER_OTLP_CERTIFICATE``) or the system's CA bundle, and issued to the collector's host
    (Envoy checks no name unless told which); SNI names the host (an IP address is never sent as SNI); ALPN ``h2``,
    which gRPC servers may require."""
    if _is_ip(collector.host):
        san = common_pb2.SubjectAltNameMatcher(
            san_type=common_pb2.SubjectAltNameMatcher.IP_ADDRESS, matcher=string_pb2.StringMatcher(exact=collector.host)
        )
        sni = ""
    else:
        san = common_pb2.SubjectAltNameMatcher(
            san_type=common_pb2.SubjectAltNameMatcher.DNS, matcher=string_pb2.StringMatcher(exact=collector.host)
        )
        sni = collector.host
    validation = common_pb2.CertificateValidationContext(
        trusted_ca=core_base_pb2.DataSource(filename=collector.ca_file or SYSTEM_CA_BUNDLE),
        match_typed_subject_alt_names=[san],
    )
    return tls_pb2.UpstreamTlsContext(
        sni=sni,
        common_tls_context=tls_pb2.CommonTlsContext(validation_context=validation, alpn_protocols=["h2"]),
    )


def ingress_response_headers(tracing: EnvoyTracing | None) -> dict[str, str]:
    """Headers the ingress's route configuration adds to every response: ``x-hydro-trace-id`` (Envoy's
    ``%TRACE_ID%``: unsampled requests get an id too, which is just not in Jaeger) while tracing is on.

    A route configuration header rather than a header mutation filter: the connection manager runs one filter
    fewer per request.
    """
    return {TRACE_ID_HEADER: "%TRACE_ID%"} if tracing is not None else {}


def add_tracing(
    manager: hcm_pb2.HttpConnectionManager, tracing: EnvoyTracing, service_name: str, *, ingress: bool
) -> None:
    """Turn tracing on in ``manager``: the ingress samples and reports the request id (the trace id is added by its
    route configuration, ``ingress_response_headers``), sidecars follow the parent."""
    manager.tracing.CopyFrom(tracing.connection_manager_tracing(service_name, ingress=ingress))
    if ingress:
        # x-request-id too, so both ids a user may hold are in the response.
        manager.always_set_request_id_in_response = True


ManagerHook = Callable[[hcm_pb2.HttpConnectionManager], None]


def tracing_hook(tracing: EnvoyTracing | None, service_name: str, *, ingress: bool) -> ManagerHook | None:
    """What resources.listeners.http_listener calls on the connection manager it builds; None when tracing is off."""
    if tracing is None:
        return None
    return lambda manager: add_tracing(manager, tracing, service_name, ingress=ingress)


def outbound_tracing_hook(tracing: EnvoyTracing | None, service_name: str) -> ManagerHook | None:
    """A pipeline sidecar's outbound listener (the pipeline runtime's stage and shadow calls): no sampling of its
    own, as any sidecar; a span per upstream attempt, as the ingress, since the stage routes retry here."""
    if tracing is None:
        return None

    def configure(manager: hcm_pb2.HttpConnectionManager) -> None:
        add_tracing(manager, tracing, service_name, ingress=False)
        manager.tracing.spawn_upstream_span.value = True
        manager.tracing.operation = f"{service_name} outbound %REQ(:PATH)%"

    return configure


def collector_clusters(tracing: EnvoyTracing | None) -> list[tuple[str, Message]]:
    """The snapshot's collector cluster, none when tracing is off."""
    return [] if tracing is None else [(COLLECTOR_CLUSTER, tracing.collector_cluster())]
