"""Envoy resource builders and type URLs: the only module that knows Envoy's API shapes.

Everything here is pure: plain arguments in, xds-protos messages out. Translation from topology to these
calls lives in translate.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    protocol_pb2,
    substitution_format_string_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2
from google.protobuf.message import Message

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

#: The order in which a push goes out (make-before-break: clusters and their endpoints before the listeners
#: and routes that name them).
PUSH_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)

APPLICATION_HEADER = "x-hydro-application"
SERVED_BY_HEADER = "x-hydro-served-by"
GRPC_MODEL_HEADER = "x-hydro-model"
GRPC_SERVICE_PREFIX = "/inference.GRPCInferenceService/"

_HTTP_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def pack(message: Message) -> any_pb2.Any:
    """Wrap a message in Any, serialized deterministically (versions are hashes of these bytes)."""
    packed = any_pb2.Any()
    packed.type_url = "type.googleapis.com/" + message.DESCRIPTOR.full_name
    packed.value = message.SerializeToString(deterministic=True)
    return packed


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
    )


def _seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


def _socket_address(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port))


def _http2_options() -> dict[str, any_pb2.Any]:
    options = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
        )
    )
    return {_HTTP_OPTIONS_KEY: pack(options)}


def eds_cluster(name: str, connect_timeout: float = 1.0) -> cluster_pb2.Cluster:
    """A cluster of sidecars found through EDS, spoken to over HTTP/2 (gRPC and REST alike)."""
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads()),
        connect_timeout=_seconds(connect_timeout),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
    )
    for key, value in _http2_options().items():
        cluster.typed_extension_protocol_options[key].CopyFrom(value)
    return cluster


def static_cluster(name: str, host: str, port: int, http2: bool, connect_timeout: float = 1.0) -> cluster_pb2.Cluster:
    """A cluster of one fixed address (a sidecar's own runtime)."""
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=_seconds(connect_timeout),
        load_assignment=load_assignment(name, [(host, port)]),
    )
    if http2:
        for key, value in _http2_options().items():
            cluster.typed_extension_protocol_options[key].CopyFrom(value)
    return cluster


def load_assignment(cluster_name: str, endpoints: Sequence[tuple[str, int]]) -> endpoint_pb2.ClusterLoadAssignment:
    """The endpoints of one cluster, sorted so that equal sets serialize to equal bytes."""
    lb_endpoints = [
        endpoint_components_pb2.LbEndpoint(
            endpoint=endpoint_components_pb2.Endpoint(address=_socket_address(host, port))
        )
        for host, port in sorted(endpoints)
    ]
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=cluster_name,
        endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=lb_endpoints)] if lb_endpoints else [],
    )


def _local_reply_config() -> hcm_pb2.LocalReplyConfig:
    """Envoy's own replies speak the Open Inference Protocol: JSON {"error"} for REST, plain grpc-message."""
    grpc_request = hcm_pb2.ResponseMapper(
        filter=_content_type_is_grpc_filter(),
        body_format_override=substitution_format_string_pb2.SubstitutionFormatString(
            text_format_source=base_pb2.DataSource(inline_string="%LOCAL_REPLY_BODY%")
        ),
    )
    json_body = struct_pb2.Struct()
    json_body.update({"error": "%LOCAL_REPLY_BODY%"})
    return hcm_pb2.LocalReplyConfig(
        mappers=[grpc_request],
        body_format=substitution_format_string_pb2.SubstitutionFormatString(
            json_format=json_body, content_type="application/json"
        ),
    )


def _content_type_is_grpc_filter() -> accesslog_pb2.AccessLogFilter:
    return accesslog_pb2.AccessLogFilter(header_filter=accesslog_pb2.HeaderFilter(header=_grpc_content_type_matcher()))


def _grpc_content_type_matcher() -> route_components_pb2.HeaderMatcher:
    return route_components_pb2.HeaderMatcher(
        name="content-type", string_match=string_pb2.StringMatcher(prefix="application/grpc")
    )


def _http_connection_manager(
    stat_prefix: str, *, rds_name: str | None = None, route_config: route_pb2.RouteConfiguration | None = None
) -> hcm_pb2.HttpConnectionManager:
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        http_filters=[hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router()))],
        local_reply_config=_local_reply_config(),
        # Infer calls can take long (cold models, big tensors); per-route timeouts bound them instead.
        stream_idle_timeout=_seconds(300),
    )
    if rds_name is not None:
        manager.rds.CopyFrom(hcm_pb2.Rds(route_config_name=rds_name, config_source=_ads()))
    elif route_config is not None:
        manager.route_config.CopyFrom(route_config)
    return manager


def http_listener(
    name: str,
    host: str,
    port: int,
    *,
    rds_name: str | None = None,
    route_config: route_pb2.RouteConfiguration | None = None,
) -> listener_pb2.Listener:
    """An HTTP listener (HTTP/1.1 and HTTP/2, so REST and gRPC on one port) with RDS or inline routes."""
    manager = _http_connection_manager(name, rds_name=rds_name, route_config=route_config)
    return listener_pb2.Listener(
        name=name,
        address=_socket_address(host, port),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager", typed_config=pack(manager)
                    )
                ]
            )
        ],
    )


@dataclass(frozen=True)
class WeightedTarget:
    """One cluster and its share of a route's traffic."""

    cluster: str
    weight: int


def _retry_policy() -> route_components_pb2.RetryPolicy:
    """Retry, on another host, what certainly never reached a model or was refused by a proxy in front of it."""
    return route_components_pb2.RetryPolicy(
        retry_on="connect-failure,refused-stream,reset,unavailable,gateway-error",
        num_retries={"value": 2},
        retry_host_predicate=[
            route_components_pb2.RetryPolicy.RetryHostPredicate(
                name="envoy.retry_host_predicates.previous_hosts",
                typed_config=pack(previous_hosts_pb2.PreviousHostsPredicate()),
            )
        ],
        host_selection_retry_max_attempts=3,
    )


def _route_action(targets: Sequence[WeightedTarget], timeout: float) -> route_components_pb2.RouteAction:
    action = route_components_pb2.RouteAction(timeout=_seconds(timeout), retry_policy=_retry_policy())
    # Sorted so that the same variants in another order give the same bytes, hence the same version.
    live = sorted((t for t in targets if t.weight > 0), key=lambda t: t.cluster)
    if len(live) == 1:
        action.cluster = live[0].cluster
    else:
        action.weighted_clusters.CopyFrom(
            route_components_pb2.WeightedCluster(
                clusters=[
                    route_components_pb2.WeightedCluster.ClusterWeight(name=t.cluster, weight={"value": t.weight})
                    for t in live
                ]
            )
        )
    return action


def _set_header(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def application_routes(
    app: str, targets: Sequence[WeightedTarget], timeout: float = 60.0
) -> list[route_components_pb2.Route]:
    """Routes for one application: gRPC chosen by the x-hydro-model header, REST by /v2/models/{app}."""
    grpc_match = route_components_pb2.RouteMatch(
        prefix=GRPC_SERVICE_PREFIX,
        headers=[
            route_components_pb2.HeaderMatcher(name=GRPC_MODEL_HEADER, string_match=string_pb2.StringMatcher(exact=app))
        ],
    )
    rest_match = route_components_pb2.RouteMatch(path_separated_prefix=f"/v2/models/{app}")
    routes = []
    for kind, match in (("grpc", grpc_match), ("rest", rest_match)):
        routes.append(
            route_components_pb2.Route(
                name=f"app|{app}|{kind}",
                match=match,
                route=_route_action(targets, timeout),
                request_headers_to_add=[_set_header(APPLICATION_HEADER, app)],
            )
        )
    return routes


def model_version_route(model: str, version: int, cluster: str, timeout: float = 60.0) -> route_components_pb2.Route:
    """REST route that addresses one model version directly: /v2/models/{model}/versions/{n}."""
    return route_components_pb2.Route(
        name=f"model|{model}|{version}",
        match=route_components_pb2.RouteMatch(path_separated_prefix=f"/v2/models/{model}/versions/{version}"),
        route=_route_action([WeightedTarget(cluster, 100)], timeout),
    )


def direct_route(name: str, prefix: str, status: int, body: str) -> route_components_pb2.Route:
    """A route Envoy answers itself; the local reply mapping turns ``body`` into an OIP error."""
    return route_components_pb2.Route(
        name=name,
        match=route_components_pb2.RouteMatch(prefix=prefix),
        direct_response=route_components_pb2.DirectResponseAction(
            status=status, body=base_pb2.DataSource(inline_string=body)
        ),
    )


def exact_direct_route(name: str, path: str, status: int, body: str) -> route_components_pb2.Route:
    """Like direct_route, for one exact path (health endpoints)."""
    route = direct_route(name, "/", status, body)
    route.match.ClearField("prefix")
    route.match.path = path
    return route


def route_configuration(
    name: str, routes: Sequence[route_components_pb2.Route], response_headers: Mapping[str, str] | None = None
) -> route_pb2.RouteConfiguration:
    """One virtual host answering every domain, adding ``response_headers`` to every response."""
    return route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[route_components_pb2.VirtualHost(name=name, domains=["*"], routes=list(routes))],
        response_headers_to_add=[_set_header(k, v) for k, v in sorted((response_headers or {}).items())],
    )


def grpc_or_http_routes(
    grpc_cluster: str, http_cluster: str, timeout: float = 60.0
) -> list[route_components_pb2.Route]:
    """A sidecar's inbound routes: gRPC to the runtime's gRPC port, everything else to its HTTP port."""
    return [
        route_components_pb2.Route(
            name="grpc",
            match=route_components_pb2.RouteMatch(prefix="/", headers=[_grpc_content_type_matcher()]),
            route=route_components_pb2.RouteAction(cluster=grpc_cluster, timeout=_seconds(timeout)),
        ),
        route_components_pb2.Route(
            name="http",
            match=route_components_pb2.RouteMatch(prefix="/"),
            route=route_components_pb2.RouteAction(cluster=http_cluster, timeout=_seconds(timeout)),
        ),
    ]


def clusters_named_by(route_config: route_pb2.RouteConfiguration) -> frozenset[str]:
    """Every cluster a route configuration sends traffic to."""
    names: set[str] = set()
    for vhost in route_config.virtual_hosts:
        for route in vhost.routes:
            if not route.HasField("route"):
                continue
            if route.route.cluster:
                names.add(route.route.cluster)
            names.update(w.name for w in route.route.weighted_clusters.clusters)
    return frozenset(names)
