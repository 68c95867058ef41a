"""What xds_control's translation adds for tracing: the collector cluster (over TLS for an https:// collector)
and each proxy's tracing block, and nothing at all without a collector. tests/tracing/test_collector_endpoints.py
has real Envoys take this config."""

from __future__ import annotations

from pathlib import Path

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.config.trace.v3 import opentelemetry_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from tracing.settings import CollectorAddress
from xds_control.resources.type_urls import CLUSTER, LISTENER, ROUTE
from xds_control.snapshot import Snapshot
from xds_control.topology import Topology
from xds_control.tracing_config import COLLECTOR_CLUSTER, SYSTEM_CA_BUNDLE, TRACE_ID_HEADER, EnvoyTracing
from xds_control.translate import (
    INGRESS_LISTENER,
    INGRESS_ROUTES,
    OUTBOUND_LISTENER,
    SIDECAR_LISTENER,
    NodeInfo,
    snapshot_for,
)

INGRESS = NodeInfo("ingress", "ingress", {"listen_port": 8080})
SIDECAR = NodeInfo(
    "sidecar~m~2~a",
    "sidecar",
    {"model": "m", "version": "2", "instance": "a", "inbound_port": 1, "runtime_grpc_port": 2, "runtime_http_port": 3},
)


def _unpack(data: bytes, message: Message) -> None:
    wrapper = any_pb2.Any.FromString(data)
    wrapper.Unpack(message)


def _manager(snapshot: Snapshot, listener_name: str) -> hcm_pb2.HttpConnectionManager:
    listener = listener_pb2.Listener()
    _unpack(snapshot.by_type[LISTENER][listener_name], listener)
    manager = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    return manager


def _response_headers(snapshot: Snapshot) -> dict[str, str]:
    """What the ingress's route configuration adds to every response."""
    routes = route_pb2.RouteConfiguration()
    _unpack(snapshot.by_type[ROUTE][INGRESS_ROUTES], routes)
    return {option.header.key: option.header.value for option in routes.response_headers_to_add}


def test_ingress_and_sidecar_trace_to_the_collector() -> None:
    tracing = EnvoyTracing.from_endpoint("http://10.1.2.3:4317", sampling_percent=12.5)
    ingress = snapshot_for(Topology(), INGRESS, tracing=tracing)
    manager = _manager(ingress, INGRESS_LISTENER)
    assert manager.tracing.random_sampling.value == 12.5
    assert manager.tracing.spawn_upstream_span.value, "each attempt of the ingress is a span"
    config = opentelemetry_pb2.OpenTelemetryConfig()
    manager.tracing.provider.typed_config.Unpack(config)
    assert config.service_name == "ingress" and config.grpc_service.envoy_grpc.cluster_name == COLLECTOR_CLUSTER
    assert manager.always_set_request_id_in_response
    assert _response_headers(ingress)[TRACE_ID_HEADER] == "%TRACE_ID%", "every answer carries the trace id"
    cluster = cluster_pb2.Cluster()
    _unpack(ingress.by_type[CLUSTER][COLLECTOR_CLUSTER], cluster)
    assert cluster.type == cluster_pb2.Cluster.STATIC

    sidecar = snapshot_for(Topology(), SIDECAR, tracing=tracing)
    manager = _manager(sidecar, SIDECAR_LISTENER)
    manager.tracing.provider.typed_config.Unpack(config)
    assert config.service_name == "sidecar m:2"
    assert manager.tracing.random_sampling.value == 0, "sidecars only follow the ingress's decision"
    assert not manager.tracing.spawn_upstream_span.value
    assert COLLECTOR_CLUSTER in sidecar.by_type[CLUSTER]


def test_a_collector_named_by_host_is_resolved_by_dns() -> None:
    cluster = EnvoyTracing.from_endpoint("jaeger:4317").collector_cluster()
    assert cluster.type == cluster_pb2.Cluster.STRICT_DNS


def test_no_collector_no_tracing() -> None:
    for node, listener in ((INGRESS, INGRESS_LISTENER), (SIDECAR, SIDECAR_LISTENER)):
        snapshot = snapshot_for(Topology(), node)
        assert not _manager(snapshot, listener).HasField("tracing")
        assert COLLECTOR_CLUSTER not in snapshot.by_type[CLUSTER]
    assert TRACE_ID_HEADER not in _response_headers(snapshot_for(Topology(), INGRESS))


def test_a_pipeline_sidecar_traces_both_its_sides() -> None:
    node = NodeInfo(
        "pipeline~app~a",
        "pipeline",
        {
            "app": "app",
            "instance": "a",
            "inbound_port": 1,
            "outbound_port": 4,
            "runtime_grpc_port": 2,
            "runtime_http_port": 3,
        },
    )
    tracing = EnvoyTracing.from_endpoint("127.0.0.1:4317")
    snapshot = snapshot_for(Topology(), node, tracing=tracing)
    inbound = _manager(snapshot, SIDECAR_LISTENER)
    config = opentelemetry_pb2.OpenTelemetryConfig()
    inbound.tracing.provider.typed_config.Unpack(config)
    assert config.service_name == "sidecar app:pipeline"
    # Stage and shadow calls: the pipeline runtime's traceparent decides; each attempt (retries) is a span.
    outbound = _manager(snapshot, OUTBOUND_LISTENER).tracing
    assert outbound.random_sampling.value == 0
    assert outbound.spawn_upstream_span.value is True
    outbound.provider.typed_config.Unpack(config)
    assert config.service_name == "sidecar app:pipeline"
    assert COLLECTOR_CLUSTER in snapshot.by_type[CLUSTER]


def _tls(cluster: cluster_pb2.Cluster) -> tls_pb2.UpstreamTlsContext:
    assert cluster.transport_socket.name == "envoy.transport_sockets.tls"
    context = tls_pb2.UpstreamTlsContext()
    cluster.transport_socket.typed_config.Unpack(context)
    return context


def test_an_https_collector_is_reached_over_tls_checked_against_the_system_cas() -> None:
    cluster = EnvoyTracing.from_endpoint("https://otel.example.com").collector_cluster()
    context = _tls(cluster)
    assert context.sni == "otel.example.com"
    validation = context.common_tls_context.validation_context
    assert validation.trusted_ca.filename == SYSTEM_CA_BUNDLE
    assert Path(SYSTEM_CA_BUNDLE).is_file(), "the system bundle is where Debian keeps it"
    (san,) = validation.match_typed_subject_alt_names
    assert (san.san_type, san.matcher.exact) == (common_pb2.SubjectAltNameMatcher.DNS, "otel.example.com")
    assert list(context.common_tls_context.alpn_protocols) == ["h2"]


def test_an_https_collector_by_ip_with_its_own_ca_file() -> None:
    collector = CollectorAddress("10.0.0.7", 4317, secure=True, ca_file="/etc/hydro/collector-ca.pem")
    context = _tls(EnvoyTracing(collector).collector_cluster())
    assert context.sni == "", "an IP address is not a server name"
    validation = context.common_tls_context.validation_context
    assert validation.trusted_ca.filename == "/etc/hydro/collector-ca.pem"
    (san,) = validation.match_typed_subject_alt_names
    assert (san.san_type, san.matcher.exact) == (common_pb2.SubjectAltNameMatcher.IP_ADDRESS, "10.0.0.7")


def test_a_plain_collector_gets_no_tls() -> None:
    assert not EnvoyTracing.from_endpoint("http://otel.example.com").collector_cluster().HasField("transport_socket")


def test_an_ipv6_collector_is_a_static_address() -> None:
    cluster = EnvoyTracing.from_endpoint("http://[::1]:4317").collector_cluster()
    assert cluster.type == cluster_pb2.Cluster.STATIC
    address = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (address.address, address.port_value) == ("::1", 4317)
