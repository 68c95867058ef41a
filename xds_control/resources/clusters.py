"""CDS resources: the clusters of model versions' sidecars (EDS, with their policies), of one fixed address, and
aggregates over other clusters."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import health_check_pb2, protocol_pb2
from envoy.extensions.clusters.aggregate.v3 import cluster_pb2 as aggregate_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2

from protos.topology.policies import CircuitBreakerPolicy, HealthCheckPolicy, OutlierDetectionPolicy
from xds_control.resources.core import ads_source, milliseconds, seconds
from xds_control.resources.endpoints import load_assignment
from xds_control.resources.type_urls import pack

_HTTP_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

#: A cluster over every deployed model version's cluster (Envoy's aggregate cluster): the first with a healthy
#: host answers.
ANY_INSTANCE_CLUSTER = "any|ready"
#: Upstream connection buffers: bodies stream through them under flow control, so they need not hold a whole
#: tensor; larger than Envoy's 1 MiB default so that big tensors move in fewer, larger writes.
UPSTREAM_BUFFER_BYTES = 16 * 2**20

#: Authority of active health checks: the default (the cluster name, with '|') is not a valid :authority.
HEALTH_CHECK_AUTHORITY = "health.hydro"
#: The gRPC health service name the runtimes report SERVING for once their model is loaded.
HEALTH_CHECK_SERVICE = "inference.GRPCInferenceService"
#: Envoy's default floor of concurrent retries under a retry budget (kept when the budget is set).
MIN_RETRY_CONCURRENCY = 3


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
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads_source()),
        connect_timeout=seconds(connect_timeout),
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
        interval=milliseconds(policy.interval_ms),
        base_ejection_time=milliseconds(policy.base_ejection_ms),
        max_ejection_percent={"value": policy.max_ejection_percent},
        # A model version runs on a few replicas: 10 % of 2 rounds down to none, which would make the policy
        # a no-op exactly where it matters most.
        always_eject_one_host={"value": True},
    )


def grpc_health_check(policy: HealthCheckPolicy) -> health_check_pb2.HealthCheck:
    """grpc.health.v1 checks through the sidecar (it routes gRPC to the runtime, whose health service answers)."""
    return health_check_pb2.HealthCheck(
        timeout=milliseconds(policy.timeout_ms),
        interval=milliseconds(policy.interval_ms),
        # Envoy checks idle clusters only once a minute by default; a model that gets no traffic yet must still
        # be found dead as fast as a busy one.
        no_traffic_interval=milliseconds(policy.interval_ms),
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
        connect_timeout=seconds(connect_timeout),
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
        connect_timeout=seconds(1.0),
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
        cluster_type=cluster_pb2.Cluster.CustomClusterType(
            name="envoy.clusters.aggregate",
            typed_config=pack(aggregate_pb2.ClusterConfig(clusters=list(clusters))),
        ),
    )
