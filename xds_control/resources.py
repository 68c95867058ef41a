"""Envoy resource builders and type URLs: the only module that knows Envoy's API shapes.

Everything here is pure: plain arguments in, xds-protos messages out. Translation from topology to these
calls lives in translate.py.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    health_check_pb2,
    protocol_pb2,
    substitution_format_string_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.clusters.aggregate.v3 import cluster_pb2 as aggregate_pb2
from envoy.extensions.filters.http.buffer.v3 import buffer_pb2
from envoy.extensions.filters.http.grpc_field_extraction.v3 import config_pb2 as field_extraction_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import metadata_pb2, regex_pb2, string_pb2, value_pb2
from envoy.type.v3 import percent_pb2, token_bucket_pb2
from google.protobuf import any_pb2, descriptor_pb2, duration_pb2, struct_pb2
from google.protobuf.message import Message

from protos.topology import (
    CircuitBreakerPolicy,
    HealthCheckPolicy,
    OutlierDetectionPolicy,
    RateLimitPolicy,
    RetryPolicy,
)

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
RATE_LIMIT_FILTER = "envoy.filters.http.local_ratelimit"
BUFFER_FILTER = "envoy.filters.http.buffer"
FIELD_EXTRACTION_FILTER = "envoy.filters.http.grpc_field_extraction"
ROUTE_REFRESH_FILTER = "envoy.filters.http.lua"
#: A second buffer filter, in front of the field extraction: it answers 413 past the mesh's request limit
#: (the extraction's own overflow answer is FAILED_PRECONDITION, which tells a client nothing).
REQUEST_LIMIT_FILTER = "hydro.request_limit"

#: The descriptor set of protos/inference.proto (`make protos`): the field extraction parses requests with it.
#: Read from the file, never from protos.inference_pb2, whose `inference` package clashes with tritonclient's.
INFERENCE_DESCRIPTOR_SET = Path(__file__).resolve().parents[1] / "protos" / "inference_descriptor.pb"
GRPC_SERVICE = "inference.GRPCInferenceService"
#: Route metadata (under ROUTE_REFRESH_FILTER) with the request limit of the route's model version(s).
MAX_REQUEST_BYTES_KEY = "max_request_bytes"
#: The OIP methods whose request names a model, and its (model, version) fields. The extraction stores each
#: field in dynamic metadata under its own name, as a list of strings.
MODEL_METHODS: dict[str, tuple[str, str]] = {
    "ModelInfer": ("model_name", "model_version"),
    "ModelMetadata": ("name", "version"),
    "ModelReady": ("name", "version"),
    "ModelConfig": ("name", "version"),
    "ModelStatistics": ("name", "version"),
}
#: The (model, version) field pairs of MODEL_METHODS: a route by name exists once per pair.
NAME_FIELDS = (("model_name", "model_version"), ("name", "version"))
#: The OIP methods about the server as a whole; the ingress sends them to any ready instance.
SERVER_METHODS = ("ServerLive", "ServerReady", "ServerMetadata")
#: REST calls about the server rather than one model: server metadata, and statistics of every model (the
#: ingress's own /v2/health/* answer without a replica).
SERVER_REST_PATHS = ("/v2", "/v2/models/stats")
#: A cluster over every deployed model version's cluster (Envoy's aggregate cluster): the first with a healthy
#: host answers.
ANY_INSTANCE_CLUSTER = "any|ready"
#: Runs after the field extraction: re-chooses the route, now that the model name is in the dynamic metadata.
#: The route was chosen on the headers, before the body came, and Envoy keeps it unless a filter clears the
#: route cache. The body reaches the buffer filter after this in one piece, which it does not check, so the
#: new route's max_request_bytes (its metadata) is checked here. Kept this short on purpose: copying the
#: extracted fields into metadata of our own here cost up to 30 % of the ingress's gRPC throughput (noisy).
_ROUTE_REFRESH_LUA = f"""\
function envoy_on_request(handle)
  handle:clearRouteCache()
  local limit = handle:metadata():get("{MAX_REQUEST_BYTES_KEY}")
  if limit ~= nil then
    local body = handle:body()
    if body ~= nil and body:length() > limit then
      handle:respond({{[":status"] = "413"}}, "request body too large")
    end
  end
end
"""

#: Default largest request body at the ingress (and message size of runtimes the deployer starts): a 256 MiB
#: tensor plus its request's framing and JSON header. xds_control --max-request-mb changes it.
DEFAULT_MAX_REQUEST_BYTES = 288 * 2**20
#: Upstream connection buffers: bodies stream through them under flow control, so they need not hold a whole
#: tensor; larger than Envoy's 1 MiB default so that big tensors move in fewer, larger writes.
UPSTREAM_BUFFER_BYTES = 16 * 2**20
#: HTTP/2's largest flow-control window (2^31 - 1).
_MAX_HTTP2_WINDOW = 2**31 - 1

#: Authority of active health checks: the default (the cluster name, with '|') is not a valid :authority.
HEALTH_CHECK_AUTHORITY = "health.hydro"
#: The gRPC health service name the runtimes report SERVING for once their model is loaded.
HEALTH_CHECK_SERVICE = "inference.GRPCInferenceService"
#: Envoy's default floor of concurrent retries under a retry budget (kept when the budget is set).
MIN_RETRY_CONCURRENCY = 3

RATE_LIMITED_MESSAGE = (
    "too many requests: the model version's rate limit (policies.rate_limit in its deployment) is exceeded; retry later"
)
GRPC_DEADLINE_EXCEEDED = "4"
GRPC_NOT_FOUND = "5"
GRPC_RESOURCE_EXHAUSTED = "8"
TOO_LARGE_MESSAGE = (
    "request body too large: the model version's policies.max_request_bytes or the mesh's limit "
    "(xds_control --max-request-mb) is exceeded"
)
#: The answer to a gRPC call naming no application or model version the mesh knows (a substitution format:
#: the model name and version come from the field extraction's dynamic metadata, as lists).
UNKNOWN_MODEL_FORMAT = (
    "no application or model version named {model} ({model_field}; {version_field} {version}); "
    "the manager's GET /api/v1/applications lists them"
)
UNKNOWN_HEADER_FORMAT = (
    f"no application named %REQ({GRPC_MODEL_HEADER})% by the {GRPC_MODEL_HEADER} request header; "
    "the manager's GET /api/v1/applications lists them"
)


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


@dataclass(frozen=True)
class ClusterPolicies:
    """The policies that live on an upstream cluster: they protect or judge the replicas of one model version."""

    circuit_breaker: CircuitBreakerPolicy
    retry_budget_percent: float | None = None
    outlier_detection: OutlierDetectionPolicy | None = None
    health_check: HealthCheckPolicy | None = None


def eds_cluster(
    name: str, connect_timeout: float = 1.0, policies: ClusterPolicies | None = None
) -> cluster_pb2.Cluster:
    """A cluster of sidecars found through EDS, spoken to over HTTP/2 (gRPC and REST alike)."""
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads()),
        connect_timeout=_seconds(connect_timeout),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
        per_connection_buffer_limit_bytes={"value": UPSTREAM_BUFFER_BYTES},
    )
    for key, value in _http2_options().items():
        cluster.typed_extension_protocol_options[key].CopyFrom(value)
    if policies is not None:
        cluster.circuit_breakers.CopyFrom(
            _shared_circuit_breakers(policies.circuit_breaker, policies.retry_budget_percent)
        )
        if policies.outlier_detection is not None:
            cluster.outlier_detection.CopyFrom(outlier_detection(policies.outlier_detection))
        if policies.health_check is not None:
            cluster.health_checks.append(grpc_health_check(policies.health_check))
    return cluster


def _ms(value: int) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromMilliseconds(value)
    return duration


@functools.lru_cache(maxsize=256)
def _shared_circuit_breakers(
    policy: CircuitBreakerPolicy, retry_budget_percent: float | None
) -> circuit_breaker_pb2.CircuitBreakers:
    # Thousands of clusters share a handful of distinct thresholds: build each once (callers copy it).
    return circuit_breakers(policy, retry_budget_percent)


def circuit_breakers(
    policy: CircuitBreakerPolicy, retry_budget_percent: float | None
) -> circuit_breaker_pb2.CircuitBreakers:
    """Default-priority thresholds; a retry budget replaces Envoy's fixed cap of 3 concurrent retries."""
    thresholds = circuit_breaker_pb2.CircuitBreakers.Thresholds(
        max_connections={"value": policy.max_connections},
        max_pending_requests={"value": policy.max_pending_requests},
        max_requests={"value": policy.max_requests},
        # The gauges (remaining_rq, remaining_pending...) let an operator see how close to the limits a model runs.
        track_remaining=True,
    )
    if retry_budget_percent is not None:
        thresholds.retry_budget.CopyFrom(
            circuit_breaker_pb2.CircuitBreakers.Thresholds.RetryBudget(
                budget_percent=percent_pb2.Percent(value=retry_budget_percent),
                min_retry_concurrency={"value": MIN_RETRY_CONCURRENCY},
            )
        )
    return circuit_breaker_pb2.CircuitBreakers(thresholds=[thresholds])


def outlier_detection(policy: OutlierDetectionPolicy) -> outlier_detection_pb2.OutlierDetection:
    """Eject a replica after ``consecutive_5xx`` failures in a row (gRPC errors count as their HTTP mapping)."""
    return outlier_detection_pb2.OutlierDetection(
        consecutive_5xx={"value": policy.consecutive_5xx},
        interval=_ms(policy.interval_ms),
        base_ejection_time=_ms(policy.base_ejection_ms),
        max_ejection_percent={"value": policy.max_ejection_percent},
        # A model version runs on a few replicas: 10 % of 2 rounds down to none, which would make the policy
        # a no-op exactly where it matters most.
        always_eject_one_host={"value": True},
    )


def grpc_health_check(policy: HealthCheckPolicy) -> health_check_pb2.HealthCheck:
    """grpc.health.v1 checks through the sidecar (it routes gRPC to the runtime, whose health service answers)."""
    return health_check_pb2.HealthCheck(
        timeout=_ms(policy.timeout_ms),
        interval=_ms(policy.interval_ms),
        # Envoy checks idle clusters only once a minute by default; a model that gets no traffic yet must still
        # be found dead as fast as a busy one.
        no_traffic_interval=_ms(policy.interval_ms),
        unhealthy_threshold={"value": policy.unhealthy_threshold},
        healthy_threshold={"value": policy.healthy_threshold},
        grpc_health_check=health_check_pb2.HealthCheck.GrpcHealthCheck(
            service_name=HEALTH_CHECK_SERVICE, authority=HEALTH_CHECK_AUTHORITY
        ),
    )


def static_cluster(name: str, host: str, port: int, http2: bool, connect_timeout: float = 1.0) -> cluster_pb2.Cluster:
    """A cluster of one fixed address (a sidecar's own runtime)."""
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=_seconds(connect_timeout),
        load_assignment=load_assignment(name, [(host, port)]),
        per_connection_buffer_limit_bytes={"value": UPSTREAM_BUFFER_BYTES},
    )
    if http2:
        for key, value in _http2_options().items():
            cluster.typed_extension_protocol_options[key].CopyFrom(value)
    return cluster


def aggregate_cluster(name: str, clusters: Sequence[str]) -> cluster_pb2.Cluster:
    """Envoy's aggregate cluster over ``clusters``: requests go to the first one (in order) with healthy hosts."""
    return cluster_pb2.Cluster(
        name=name,
        connect_timeout=_seconds(1.0),
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
        cluster_type=cluster_pb2.Cluster.CustomClusterType(
            name="envoy.clusters.aggregate",
            typed_config=pack(aggregate_pb2.ClusterConfig(clusters=list(clusters))),
        ),
    )


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


def _plain_text() -> substitution_format_string_pb2.SubstitutionFormatString:
    return substitution_format_string_pb2.SubstitutionFormatString(
        text_format_source=base_pb2.DataSource(inline_string="%LOCAL_REPLY_BODY%")
    )


def _status_is(code: int) -> accesslog_pb2.AccessLogFilter:
    return accesslog_pb2.AccessLogFilter(
        status_code_filter=accesslog_pb2.StatusCodeFilter(
            comparison=accesslog_pb2.ComparisonFilter(
                op=accesslog_pb2.ComparisonFilter.EQ,
                value=base_pb2.RuntimeUInt32(default_value=code, runtime_key=f"hydro.local_reply.status_{code}"),
            )
        )
    )


def _all_of(*filters: accesslog_pb2.AccessLogFilter) -> accesslog_pb2.AccessLogFilter:
    return accesslog_pb2.AccessLogFilter(and_filter=accesslog_pb2.AndFilter(filters=list(filters)))


def _extracted(field: str) -> accesslog_pb2.AccessLogFilter:
    return accesslog_pb2.AccessLogFilter(
        metadata_filter=accesslog_pb2.MetadataFilter(
            matcher=metadata_pb2.MetadataMatcher(
                filter=FIELD_EXTRACTION_FILTER,
                path=[metadata_pb2.MetadataMatcher.PathSegment(key=field)],
                value=value_pb2.ValueMatcher(present_match=True),
            ),
            match_if_key_not_found={"value": False},
        )
    )


def _has_header(name: str) -> accesslog_pb2.AccessLogFilter:
    return accesslog_pb2.AccessLogFilter(
        header_filter=accesslog_pb2.HeaderFilter(
            header=route_components_pb2.HeaderMatcher(name=name, present_match=True)
        )
    )


def _text(format_string: str) -> substitution_format_string_pb2.SubstitutionFormatString:
    return substitution_format_string_pb2.SubstitutionFormatString(
        text_format_source=base_pb2.DataSource(inline_string=format_string)
    )


def _local_reply_config() -> hcm_pb2.LocalReplyConfig:
    """Envoy's own replies speak the Open Inference Protocol: JSON {"error"} for REST, plain grpc-message.

    The policy rejections (429 rate limited, 413 too large) get a message that says which policy refused the
    call; the first matching mapper wins, so the gRPC variants come first.
    """
    grpc = _content_type_is_grpc_filter()
    mappers = [
        hcm_pb2.ResponseMapper(
            filter=_all_of(grpc, _status_is(429)),
            body=base_pb2.DataSource(inline_string=RATE_LIMITED_MESSAGE),
            body_format_override=_plain_text(),
        ),
        hcm_pb2.ResponseMapper(
            filter=_all_of(grpc, _status_is(413)),
            body=base_pb2.DataSource(inline_string=TOO_LARGE_MESSAGE),
            body_format_override=_plain_text(),
            headers_to_add=[_set_header("grpc-status", GRPC_RESOURCE_EXHAUSTED)],
        ),
        # No route for the model a gRPC call names: NOT_FOUND naming it (Envoy's own mapping of 404 would be
        # UNIMPLEMENTED, which tells a client the method does not exist).
        hcm_pb2.ResponseMapper(
            filter=_all_of(grpc, _status_is(404), _has_header(GRPC_MODEL_HEADER)),
            body_format_override=_text(UNKNOWN_HEADER_FORMAT),
            headers_to_add=[_set_header("grpc-status", GRPC_NOT_FOUND)],
        ),
        *(
            hcm_pb2.ResponseMapper(
                filter=_all_of(grpc, _status_is(404), _extracted(model_field)),
                body_format_override=_text(
                    UNKNOWN_MODEL_FORMAT.format(
                        model=f"%DYNAMIC_METADATA({FIELD_EXTRACTION_FILTER}:{model_field})%",
                        version=f"%DYNAMIC_METADATA({FIELD_EXTRACTION_FILTER}:{version_field})%",
                        model_field=model_field,
                        version_field=version_field,
                    )
                ),
                headers_to_add=[_set_header("grpc-status", GRPC_NOT_FOUND)],
            )
            for model_field, version_field in NAME_FIELDS
        ),
        hcm_pb2.ResponseMapper(
            filter=_all_of(grpc, _status_is(404)),
            body_format_override=_plain_text(),
            headers_to_add=[_set_header("grpc-status", GRPC_NOT_FOUND)],
        ),
        hcm_pb2.ResponseMapper(
            filter=_all_of(grpc, _status_is(504)),
            body_format_override=_plain_text(),
            headers_to_add=[_set_header("grpc-status", GRPC_DEADLINE_EXCEEDED)],
        ),
        # The ingress's own health answers ({"live": true}): already OIP JSON, not an error.
        hcm_pb2.ResponseMapper(
            filter=_status_is(200),
            body_format_override=substitution_format_string_pb2.SubstitutionFormatString(
                text_format_source=base_pb2.DataSource(inline_string="%LOCAL_REPLY_BODY%"),
                content_type="application/json",
            ),
        ),
        hcm_pb2.ResponseMapper(filter=_status_is(429), body=base_pb2.DataSource(inline_string=RATE_LIMITED_MESSAGE)),
        hcm_pb2.ResponseMapper(filter=_status_is(413), body=base_pb2.DataSource(inline_string=TOO_LARGE_MESSAGE)),
        hcm_pb2.ResponseMapper(filter=grpc, body_format_override=_plain_text()),
    ]
    json_body = struct_pb2.Struct()
    json_body.update({"error": "%LOCAL_REPLY_BODY%"})
    return hcm_pb2.LocalReplyConfig(
        mappers=mappers,
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


def _policy_filters() -> list[hcm_pb2.HttpFilter]:
    """Rate limit and body size filters, inert unless a route enables them with its per-filter config.

    The rate limiter comes first so that a request over the limit is refused before its body is buffered.
    """
    return [
        # Without a token bucket here, the filter limits only routes that carry a LocalRateLimit of their own.
        hcm_pb2.HttpFilter(
            name=RATE_LIMIT_FILTER, typed_config=pack(local_rate_limit_pb2.LocalRateLimit(stat_prefix="rate_limit"))
        ),
        hcm_pb2.HttpFilter(
            name=BUFFER_FILTER,
            # Disabled by default: buffering every request would cost latency and memory on routes without a limit.
            typed_config=pack(buffer_pb2.Buffer(max_request_bytes={"value": 1024 * 1024})),
            disabled=True,
        ),
    ]


@functools.cache
def _field_extraction_packed() -> any_pb2.Any:
    # Read and parsed once per process: the ingress listener is rebuilt on every topology change.
    return pack(field_extraction_config(INFERENCE_DESCRIPTOR_SET.read_bytes()))


def model_methods(descriptor_set: bytes) -> dict[str, tuple[str, str]]:
    """The MODEL_METHODS the descriptor set's GRPCInferenceService has (Envoy refuses unknown ones)."""
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set)
    present = {
        f"{proto.package}.{service.name}.{method.name}"
        for proto in files.file
        for service in proto.service
        for method in service.method
    }
    return {name: fields for name, fields in MODEL_METHODS.items() if f"{GRPC_SERVICE}.{name}" in present}


def field_extraction_config(descriptor_set: bytes) -> field_extraction_pb2.GrpcFieldExtractionConfig:
    """Put the model and version fields of the gRPC requests that name a model into dynamic metadata."""
    by_method = {}
    for method, (model_field, version_field) in sorted(model_methods(descriptor_set).items()):
        by_method[f"{GRPC_SERVICE}.{method}"] = field_extraction_pb2.FieldExtractions(
            request_field_extractions={
                # Envoy 1.40 stores each field under its own name whatever this says; say so.
                model_field: field_extraction_pb2.RequestFieldValueDisposition(dynamic_metadata=model_field),
                version_field: field_extraction_pb2.RequestFieldValueDisposition(dynamic_metadata=version_field),
            }
        )
    return field_extraction_pb2.GrpcFieldExtractionConfig(
        descriptor_set=base_pb2.DataSource(inline_bytes=descriptor_set), extractions_by_method=by_method
    )


def _model_routing_filters(max_request_bytes: int) -> list[hcm_pb2.HttpFilter]:
    """Header-less gRPC routing: extract the model name from the request, then choose the route again.

    The route refresh is disabled by default; only the route a header-less gRPC call lands on before its body
    is read (the gRPC fallback route) enables it. The extraction passes REST and other gRPC methods through
    untouched; routes chosen by the x-hydro-model header disable it, so their bodies are not held.
    """
    return [
        hcm_pb2.HttpFilter(
            name=REQUEST_LIMIT_FILTER,
            typed_config=pack(buffer_pb2.Buffer(max_request_bytes={"value": max_request_bytes})),
            disabled=True,
        ),
        # Envoy cannot enable a disabled filter per route without a per-route config, which this one lacks.
        hcm_pb2.HttpFilter(name=FIELD_EXTRACTION_FILTER, typed_config=_field_extraction_packed()),
        hcm_pb2.HttpFilter(
            name=ROUTE_REFRESH_FILTER,
            typed_config=pack(lua_pb2.Lua(default_source_code=base_pb2.DataSource(inline_string=_ROUTE_REFRESH_LUA))),
            disabled=True,
        ),
    ]


def route_refresh_enabled(max_request_bytes: int) -> dict[str, any_pb2.Any]:
    """Per-filter configs that turn the request limit and the route refresh on for one route."""
    return {
        REQUEST_LIMIT_FILTER: pack(
            buffer_pb2.BufferPerRoute(buffer=buffer_pb2.Buffer(max_request_bytes={"value": max_request_bytes}))
        ),
        # Lua refuses an empty per-route config.
        ROUTE_REFRESH_FILTER: pack(
            lua_pb2.LuaPerRoute(source_code=base_pb2.DataSource(inline_string=_ROUTE_REFRESH_LUA))
        ),
    }


def field_extraction_disabled() -> dict[str, any_pb2.Any]:
    """The per-filter config that keeps the field extraction off a route (the header already chose it)."""
    return {FIELD_EXTRACTION_FILTER: pack(route_components_pb2.FilterConfig(disabled=True))}


def _http_connection_manager(
    stat_prefix: str,
    *,
    rds_name: str | None = None,
    route_config: route_pb2.RouteConfiguration | None = None,
    policy_filters: bool = False,
    model_routing: bool = False,
    buffer_limit_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    configure: Callable[[hcm_pb2.HttpConnectionManager], None] | None = None,
) -> hcm_pb2.HttpConnectionManager:
    # Extraction and route refresh come first: the rate limit and body size filters read the route's
    # per-filter configs, so they must see the route chosen by the model name.
    filters = _model_routing_filters(buffer_limit_bytes) if model_routing else []
    filters.extend(_policy_filters() if policy_filters else [])
    filters.append(hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router())))
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        http_filters=filters,
        local_reply_config=_local_reply_config(),
        # Infer calls can take long (cold models, big tensors); per-route timeouts bound them instead.
        stream_idle_timeout=_seconds(300),
    )
    if model_routing:
        # A filter may hold at most one HTTP/2 stream window of a request (Envoy's default: 16 MiB), and the
        # field extraction holds a whole ModelInferRequest: the window must fit the largest request allowed.
        window = min(buffer_limit_bytes, _MAX_HTTP2_WINDOW)
        manager.http2_protocol_options.CopyFrom(
            protocol_pb2.Http2ProtocolOptions(
                initial_stream_window_size={"value": window}, initial_connection_window_size={"value": window}
            )
        )
    if rds_name is not None:
        manager.rds.CopyFrom(hcm_pb2.Rds(route_config_name=rds_name, config_source=_ads()))
    elif route_config is not None:
        manager.route_config.CopyFrom(route_config)
    if configure is not None:
        configure(manager)
    return manager


def http_listener(
    name: str,
    host: str,
    port: int,
    *,
    rds_name: str | None = None,
    route_config: route_pb2.RouteConfiguration | None = None,
    policy_filters: bool = False,
    model_routing: bool = False,
    buffer_limit_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    configure: Callable[[hcm_pb2.HttpConnectionManager], None] | None = None,
    exact_balance: bool = False,
) -> listener_pb2.Listener:
    """An HTTP listener (HTTP/1.1 and HTTP/2, so REST and gRPC on one port) with RDS or inline routes.

    ``policy_filters`` adds the rate limit and request size filters that routes may enable, ``model_routing``
    the filters that route gRPC calls by the model their request names (both for the ingress).
    ``buffer_limit_bytes`` is the most a filter may buffer of one request (413 beyond it): the field extraction
    holds a whole ModelInferRequest before the call is routed. ``configure`` may amend the HTTP connection
    manager last (xds_control.tracing_config adds tracing with it). ``exact_balance`` spreads accepted
    connections evenly over Envoy's workers, for listeners that take few long-lived connections (the mesh's own).
    """
    manager = _http_connection_manager(
        name,
        rds_name=rds_name,
        route_config=route_config,
        policy_filters=policy_filters,
        model_routing=model_routing,
        buffer_limit_bytes=buffer_limit_bytes,
        configure=configure,
    )
    # Envoy binds a connection to the worker that accepted it, and the kernel picks that worker at random. A
    # listener inside the mesh takes few long-lived HTTP/2 connections (a sidecar: one per ingress worker): left
    # to chance, half the time both land on one worker, which then carries all the load while the other idles, for
    # as long as the connections live. Exact balance hands each new connection to the least-loaded worker, at the
    # price of a lock per accept: not for the ingress, whose clients may open a connection per request.
    balance = (
        listener_pb2.Listener.ConnectionBalanceConfig(
            exact_balance=listener_pb2.Listener.ConnectionBalanceConfig.ExactBalance()
        )
        if exact_balance
        else None
    )
    return listener_pb2.Listener(
        name=name,
        address=_socket_address(host, port),
        per_connection_buffer_limit_bytes={"value": buffer_limit_bytes},
        connection_balance_config=balance,
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
class RequestLimits:
    """What the ingress refuses before calling a model version: too many requests, too large a body."""

    stat_prefix: str
    rate_limit: RateLimitPolicy | None = None
    max_request_bytes: int | None = None

    def filter_configs(self) -> dict[str, any_pb2.Any]:
        """Per-filter configs for a route or weighted cluster (typed_per_filter_config)."""
        configs: dict[str, any_pb2.Any] = {}
        if self.rate_limit is not None:
            configs[RATE_LIMIT_FILTER] = pack(local_rate_limit(self.stat_prefix, self.rate_limit))
        if self.max_request_bytes is not None:
            configs[BUFFER_FILTER] = pack(
                buffer_pb2.BufferPerRoute(buffer=buffer_pb2.Buffer(max_request_bytes={"value": self.max_request_bytes}))
            )
        return configs


def local_rate_limit(stat_prefix: str, policy: RateLimitPolicy) -> local_rate_limit_pb2.LocalRateLimit:
    """A token bucket of ``burst`` tokens refilled with ``requests_per_second`` every second, enforced always."""
    always = base_pb2.RuntimeFractionalPercent(
        default_value=percent_pb2.FractionalPercent(numerator=100, denominator=percent_pb2.FractionalPercent.HUNDRED),
        runtime_key="hydro.rate_limit.enabled",
    )
    enforced = base_pb2.RuntimeFractionalPercent()
    enforced.CopyFrom(always)
    enforced.runtime_key = "hydro.rate_limit.enforced"
    return local_rate_limit_pb2.LocalRateLimit(
        stat_prefix=stat_prefix,
        token_bucket=token_bucket_pb2.TokenBucket(
            max_tokens=policy.bucket_size,
            tokens_per_fill={"value": policy.requests_per_second},
            fill_interval=_seconds(1.0),
        ),
        filter_enabled=always,
        filter_enforced=enforced,
        # gRPC clients should back off (RESOURCE_EXHAUSTED), not fail over as they do on UNAVAILABLE.
        rate_limited_as_resource_exhausted=True,
    )


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
        retry.per_try_timeout.CopyFrom(_ms(per_try_timeout_ms))
    return retry


_DEFAULT_ROUTE_POLICIES = RoutePolicies(retries=RetryPolicy())


def _route_action(targets: Sequence[WeightedTarget], policies: RoutePolicies) -> route_components_pb2.RouteAction:
    action = route_components_pb2.RouteAction(timeout=_ms(policies.timeout_ms))
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


def _set_header(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


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
    (ModelInferRequest.model_name, ModelMetadataRequest.name...), REST by /v2/models/{app}."""
    header_match = route_components_pb2.RouteMatch(
        prefix=GRPC_SERVICE_PREFIX,
        headers=[
            route_components_pb2.HeaderMatcher(name=GRPC_MODEL_HEADER, string_match=string_pb2.StringMatcher(exact=app))
        ],
    )
    # Only match once the field extraction has run and the route cache was cleared (see _model_routing_filters):
    # one route per field name (ModelInfer's model_name, the other methods' name).
    by_name = [
        (
            f"grpc-{model_field}",
            route_components_pb2.RouteMatch(
                prefix=GRPC_SERVICE_PREFIX, dynamic_metadata=[_extracted_is(model_field, app)]
            ),
        )
        for model_field, _ in NAME_FIELDS
    ]
    rest_match = route_components_pb2.RouteMatch(path_separated_prefix=f"/v2/models/{app}")
    routes = []
    for kind, match in (("grpc", header_match), *by_name, ("rest", rest_match)):
        route = _route(f"app|{app}|{kind}", match, targets, policies)
        route.request_headers_to_add.append(_set_header(APPLICATION_HEADER, app))
        if kind == "grpc":
            for filter_name, config in field_extraction_disabled().items():
                route.typed_per_filter_config[filter_name].CopyFrom(config)
        routes.append(route)
    return routes


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
        route.request_headers_to_add.append(_set_header(key, header_value))
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
        direct_response=route_components_pb2.DirectResponseAction(status=status, body_format=_text(body)),
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
