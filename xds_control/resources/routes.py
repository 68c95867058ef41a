"""RDS resources: the routes of the ingress and of sidecars (by application, model version, request header or
extracted model name), their actions (deadline, retries, weighted clusters and those clusters' request limits),
routes Envoy answers itself, and route configurations."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.type.matcher.v3 import metadata_pb2, regex_pb2, string_pb2, value_pb2

from protos.topology.policies import RetryPolicy
from xds_control.resources.core import milliseconds, seconds, set_header, text_format
from xds_control.resources.headerless_grpc import (
    FIELD_EXTRACTION_FILTER,
    MAX_REQUEST_BYTES_KEY,
    NAME_FIELDS,
    ROUTE_REFRESH_FILTER,
    field_extraction_disabled,
    route_refresh_enabled,
)
from xds_control.resources.request_limits import DEFAULT_MAX_REQUEST_BYTES, RequestLimits
from xds_control.resources.type_urls import pack

APPLICATION_HEADER = "x-hydro-application"
SERVED_BY_HEADER = "x-hydro-served-by"
GRPC_MODEL_HEADER = "x-hydro-model"
GRPC_SERVICE_PREFIX = "/inference.GRPCInferenceService/"

#: The OIP methods about the server as a whole; the ingress sends them to any ready instance.
SERVER_METHODS = ("ServerLive", "ServerReady", "ServerMetadata")
#: REST calls about the server rather than one model: server metadata, and statistics of every model (the
#: ingress's own /v2/health/* answer without a replica).
SERVER_REST_PATHS = ("/v2", "/v2/models/stats")


@dataclass(frozen=True)
class WeightedTarget:
    """One cluster and its share of a route's traffic, with the request limits of its model version."""

    cluster: str
    weight: int
    limits: RequestLimits | None = None


@dataclass(frozen=True)
class RoutePolicies:
    """What lives on a route's action: the deadline of a call and how it is retried."""

    timeout_ms: int = 60_000
    retries: RetryPolicy | None = None


def retry_policy(policy: RetryPolicy) -> route_components_pb2.RetryPolicy | None:
    """Retry on another host than the ones already tried; None when retries are off."""
    if policy.attempts == 0:
        return None
    retry = route_components_pb2.RetryPolicy()
    retry.CopyFrom(_shared_retry_policy(policy.attempts, policy.per_try_timeout_ms, tuple(policy.retry_on)))
    return retry


# Thousands of routes share a handful of distinct policies: build each once (callers copy it, never mutate it).
@functools.lru_cache(maxsize=256)
def _shared_retry_policy(
    attempts: int, per_try_timeout_ms: int | None, retry_on: tuple[str, ...]
) -> route_components_pb2.RetryPolicy:
    retry = route_components_pb2.RetryPolicy(
        retry_on=",".join(retry_on),
        num_retries={"value": attempts},
        retry_host_predicate=[
            route_components_pb2.RetryPolicy.RetryHostPredicate(
                name="envoy.retry_host_predicates.previous_hosts",
                typed_config=pack(previous_hosts_pb2.PreviousHostsPredicate()),
            )
        ],
        host_selection_retry_max_attempts=3,
    )
    if per_try_timeout_ms is not None:
        retry.per_try_timeout.CopyFrom(milliseconds(per_try_timeout_ms))
    return retry


_DEFAULT_ROUTE_POLICIES = RoutePolicies(retries=RetryPolicy())


def _route_action(targets: Sequence[WeightedTarget], policies: RoutePolicies) -> route_components_pb2.RouteAction:
    action = route_components_pb2.RouteAction(timeout=milliseconds(policies.timeout_ms))
    retries = policies.retries
    if retries is not None and retries.attempts > 0:
        action.retry_policy.CopyFrom(
            _shared_retry_policy(retries.attempts, retries.per_try_timeout_ms, tuple(retries.retry_on))
        )
    # Sorted so that the same variants in another order give the same bytes, hence the same version.
    live = sorted((t for t in targets if t.weight > 0), key=lambda t: t.cluster)
    if len(live) == 1:
        action.cluster = live[0].cluster
    else:
        weights = []
        for t in live:
            weight = route_components_pb2.WeightedCluster.ClusterWeight(name=t.cluster, weight={"value": t.weight})
            # Each variant keeps its own limits: the rate limit and body size filters read the chosen cluster's.
            for filter_name, config in (t.limits.filter_configs() if t.limits else {}).items():
                weight.typed_per_filter_config[filter_name].CopyFrom(config)
            weights.append(weight)
        action.weighted_clusters.CopyFrom(route_components_pb2.WeightedCluster(clusters=weights))
    return action


def _route(
    name: str, match: route_components_pb2.RouteMatch, targets: Sequence[WeightedTarget], policies: RoutePolicies
) -> route_components_pb2.Route:
    route = route_components_pb2.Route(name=name, match=match, route=_route_action(targets, policies))
    live = [t for t in targets if t.weight > 0]
    limits = [t.limits.max_request_bytes if t.limits is not None else None for t in live]
    if live and all(limit is not None for limit in limits):
        # For the route refresh's check of header-less gRPC calls: the largest of the variants' limits (it
        # runs before the router picks a variant).
        route.metadata.filter_metadata[ROUTE_REFRESH_FILTER].update(
            {MAX_REQUEST_BYTES_KEY: max(limit for limit in limits if limit is not None)}
        )
    if len(live) == 1 and live[0].limits is not None:
        for filter_name, config in live[0].limits.filter_configs().items():
            route.typed_per_filter_config[filter_name].CopyFrom(config)
    return route


def _extracted_is(field: str, value: str) -> metadata_pb2.MetadataMatcher:
    # The field extraction stores each field under its own name as a list of strings.
    return metadata_pb2.MetadataMatcher(
        filter=FIELD_EXTRACTION_FILTER,
        path=[metadata_pb2.MetadataMatcher.PathSegment(key=field)],
        value=value_pb2.ValueMatcher(
            list_match=value_pb2.ListMatcher(
                one_of=value_pb2.ValueMatcher(string_match=string_pb2.StringMatcher(exact=value))
            )
        ),
    )


def _extracted_matches(field: str, regex: str, invert: bool = False) -> metadata_pb2.MetadataMatcher:
    """Whether an extracted field's value matches ``regex`` (inverted: also true before the extraction ran)."""
    return metadata_pb2.MetadataMatcher(
        filter=FIELD_EXTRACTION_FILTER,
        path=[metadata_pb2.MetadataMatcher.PathSegment(key=field)],
        value=value_pb2.ValueMatcher(
            list_match=value_pb2.ListMatcher(
                one_of=value_pb2.ValueMatcher(
                    string_match=string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=regex))
                )
            )
        ),
        invert=invert,
    )


def application_routes(
    app: str, targets: Sequence[WeightedTarget], policies: RoutePolicies = _DEFAULT_ROUTE_POLICIES
) -> list[route_components_pb2.Route]:
    """Routes for one application: gRPC by the x-hydro-model header or else by the model name in the request
    (ModelInferRequest.model_name, ModelMetadataRequest.name...) with no version, REST by /v2/models/{app}.

    An application has no versions: a header-less call naming one (model_name "iris", model_version "2") is not
    the application's, and falls through to the gRPC fallback's NOT_FOUND unless a deployed model version's route
    took it first; undeployed_version_route does the same for REST."""
    header_match = route_components_pb2.RouteMatch(
        prefix=GRPC_SERVICE_PREFIX,
        headers=[
            route_components_pb2.HeaderMatcher(name=GRPC_MODEL_HEADER, string_match=string_pb2.StringMatcher(exact=app))
        ],
    )
    # Only match once the field extraction has run and the route cache was cleared (see
    # headerless_grpc.model_routing_filters): one route per field name (ModelInfer's model_name, the other
    # methods' name). A version in the request keeps the call off the application's route: sent to a variant's
    # runtime, it was answered by a version that runtime happens to serve, or refused as "not here".
    by_name = [
        (
            f"grpc-{model_field}",
            route_components_pb2.RouteMatch(
                prefix=GRPC_SERVICE_PREFIX,
                dynamic_metadata=[
                    _extracted_is(model_field, app),
                    _extracted_matches(version_field, ".+", invert=True),
                ],
            ),
        )
        for model_field, version_field in NAME_FIELDS
    ]
    rest_match = route_components_pb2.RouteMatch(path_separated_prefix=f"/v2/models/{app}")
    routes = []
    for kind, match in (("grpc", header_match), *by_name, ("rest", rest_match)):
        route = _route(f"app|{app}|{kind}", match, targets, policies)
        route.request_headers_to_add.append(set_header(APPLICATION_HEADER, app))
        if kind == "grpc":
            for filter_name, config in field_extraction_disabled().items():
                route.typed_per_filter_config[filter_name].CopyFrom(config)
        routes.append(route)
    return routes


def undeployed_version_route(not_found_body: str) -> route_components_pb2.Route:
    """REST /v2/models/{name}/versions/... that no deployed model version's route took: the ingress answers 404
    with ``not_found_body`` itself. It goes after the deployed versions' routes and before the applications'
    REST routes, whose /v2/models/{app} prefix would otherwise send a versioned path under an application's name
    (an application has no versions) to a variant's runtime. One route for every name, not one per application:
    a route per application added 14 % to the route configuration of 2,000 applications."""
    route = direct_route("no-deployed-version", "/", 404, not_found_body)
    route.match.ClearField("prefix")
    route.match.safe_regex.regex = "/v2/models/[^/]+/versions(/.*)?"
    return route


def header_route(
    name: str,
    header: str,
    value: str,
    targets: Sequence[WeightedTarget],
    policies: RoutePolicies = _DEFAULT_ROUTE_POLICIES,
    request_headers: Mapping[str, str] | None = None,
) -> route_components_pb2.Route:
    """A route chosen by one request header's exact value (a pipeline sidecar's outbound routes), REST and gRPC."""
    match = route_components_pb2.RouteMatch(
        prefix="/",
        headers=[route_components_pb2.HeaderMatcher(name=header, string_match=string_pb2.StringMatcher(exact=value))],
    )
    route = _route(name, match, targets, policies)
    for key, header_value in sorted((request_headers or {}).items()):
        route.request_headers_to_add.append(set_header(key, header_value))
    return route


def model_version_route(
    model: str,
    version: int,
    cluster: str,
    policies: RoutePolicies = _DEFAULT_ROUTE_POLICIES,
    limits: RequestLimits | None = None,
) -> route_components_pb2.Route:
    """REST route that addresses one model version directly: /v2/models/{model}/versions/{n}."""
    return _route(
        f"model|{model}|{version}",
        route_components_pb2.RouteMatch(path_separated_prefix=f"/v2/models/{model}/versions/{version}"),
        [WeightedTarget(cluster, 100, limits)],
        policies,
    )


def model_version_grpc_routes(
    model: str,
    version: int,
    cluster: str,
    policies: RoutePolicies = _DEFAULT_ROUTE_POLICIES,
    limits: RequestLimits | None = None,
) -> list[route_components_pb2.Route]:
    """gRPC routes to one model version, chosen by the model name and version its request names."""
    routes = []
    for model_field, version_field in NAME_FIELDS:
        match = route_components_pb2.RouteMatch(
            prefix=GRPC_SERVICE_PREFIX,
            dynamic_metadata=[_extracted_is(model_field, model), _extracted_is(version_field, str(version))],
        )
        target = WeightedTarget(cluster, 100, limits)
        routes.append(_route(f"model|{model}|{version}|grpc-{model_field}", match, [target], policies))
    return routes


def server_routes(
    cluster: str | None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
) -> list[route_components_pb2.Route]:
    """Server-wide calls: ServerLive, ServerReady, ServerMetadata, their REST peers, and statistics of every model
    (ModelStatistics naming no model). Any ready instance answers (``cluster``, an aggregate of every model
    version's cluster), or UNAVAILABLE when no model version is deployed (None)."""
    matches = [(f"server|{m}", route_components_pb2.RouteMatch(path=GRPC_SERVICE_PREFIX + m)) for m in SERVER_METHODS]
    matches += [(f"server|{path}", route_components_pb2.RouteMatch(path=path)) for path in SERVER_REST_PATHS]
    # ModelStatistics names its model in the request body: this route is first chosen before the body is read
    # (the name is not extracted yet), and turns the route refresh on. Chosen again with the name extracted, a
    # named call goes to its model's route (earlier in the list); one naming no model stays here.
    statistics = route_components_pb2.RouteMatch(
        path=GRPC_SERVICE_PREFIX + "ModelStatistics",
        dynamic_metadata=[_extracted_matches("name", ".+", invert=True)],
    )
    matches.append(("server|ModelStatistics", statistics))
    routes = []
    for name, match in matches:
        if cluster is None:
            route = direct_route(name, "/", 503, "no model version is deployed")
            route.match.CopyFrom(match)
        else:
            route = _route(name, match, [WeightedTarget(cluster, 100)], _DEFAULT_ROUTE_POLICIES)
        if name == "server|ModelStatistics":
            for filter_name, config in route_refresh_enabled(max_request_bytes).items():
                route.typed_per_filter_config[filter_name].CopyFrom(config)
        routes.append(route)
    return routes


def grpc_fallback_routes(
    not_found_body: str, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
) -> list[route_components_pb2.Route]:
    """The last gRPC routes: a call whose x-hydro-model header names no application gets NOT_FOUND at once; any
    other lands here before its body is read, so this route turns the route refresh on. If the route chosen
    again with the model name is still this one, the model is unknown: NOT_FOUND naming it.
    ``max_request_bytes`` bounds what the field extraction buffers of a request."""
    unknown_header = direct_route("no-grpc-route-by-header", GRPC_SERVICE_PREFIX, 404, not_found_body)
    unknown_header.match.headers.append(route_components_pb2.HeaderMatcher(name=GRPC_MODEL_HEADER, present_match=True))
    for filter_name, config in field_extraction_disabled().items():
        unknown_header.typed_per_filter_config[filter_name].CopyFrom(config)
    fallback = direct_route("no-grpc-route", GRPC_SERVICE_PREFIX, 404, not_found_body)
    for filter_name, config in route_refresh_enabled(max_request_bytes).items():
        fallback.typed_per_filter_config[filter_name].CopyFrom(config)
    return [unknown_header, fallback]


def direct_route(name: str, prefix: str, status: int, body: str) -> route_components_pb2.Route:
    """A route Envoy answers itself; the local reply mapping turns ``body`` into an OIP error (a 200 is sent as
    is). ``body`` is a substitution format string: %REQ(:PATH)% names the path asked for."""
    return route_components_pb2.Route(
        name=name,
        match=route_components_pb2.RouteMatch(prefix=prefix),
        direct_response=route_components_pb2.DirectResponseAction(status=status, body_format=text_format(body)),
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
        response_headers_to_add=[set_header(k, v) for k, v in sorted((response_headers or {}).items())],
    )


def grpc_content_type_matcher() -> route_components_pb2.HeaderMatcher:
    """Matches gRPC requests (content-type application/grpc, +proto or any other suffix)."""
    return route_components_pb2.HeaderMatcher(
        name="content-type", string_match=string_pb2.StringMatcher(prefix="application/grpc")
    )


def grpc_or_http_routes(
    grpc_cluster: str, http_cluster: str, timeout: float = 60.0
) -> list[route_components_pb2.Route]:
    """A sidecar's inbound routes: gRPC to the runtime's gRPC port, everything else to its HTTP port."""
    return [
        route_components_pb2.Route(
            name="grpc",
            match=route_components_pb2.RouteMatch(prefix="/", headers=[grpc_content_type_matcher()]),
            route=route_components_pb2.RouteAction(cluster=grpc_cluster, timeout=seconds(timeout)),
        ),
        route_components_pb2.Route(
            name="http",
            match=route_components_pb2.RouteMatch(prefix="/"),
            route=route_components_pb2.RouteAction(cluster=http_cluster, timeout=seconds(timeout)),
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
