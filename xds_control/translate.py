"""Translation of the desired topology into per-node snapshots: ingress, sidecar and pipeline roles."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from protos.topology.applications import Application, Stage
from protos.topology.policies import Policies, RetryPolicy
from xds_control.build_cache import BuildCache
from xds_control.resources.clusters import (
    ANY_INSTANCE_CLUSTER,
    ClusterPolicies,
    aggregate_cluster,
    eds_cluster,
    static_cluster,
)
from xds_control.resources.endpoints import load_assignment
from xds_control.resources.listeners import http_listener
from xds_control.resources.local_replies import serving
from xds_control.resources.request_limits import DEFAULT_MAX_REQUEST_BYTES, RequestLimits
from xds_control.resources.routes import (
    APPLICATION_HEADER,
    SERVED_BY_HEADER,
    RoutePolicies,
    WeightedTarget,
    application_routes,
    clusters_named_by,
    direct_route,
    exact_direct_route,
    grpc_fallback_routes,
    grpc_or_http_routes,
    header_route,
    model_version_grpc_routes,
    model_version_route,
    route_configuration,
    server_routes,
    undeployed_version_route,
)
from xds_control.resources.type_urls import CLUSTER, ENDPOINT, LISTENER, ROUTE
from xds_control.snapshot import Snapshot, serialize
from xds_control.topology import Topology
from xds_control.tracing_config import (
    INGRESS_SERVICE,
    EnvoyTracing,
    collector_clusters,
    ingress_response_headers,
    outbound_tracing_hook,
    sidecar_service,
    tracing_hook,
)

INGRESS_LISTENER = "ingress"
INGRESS_ROUTES = "ingress"
SIDECAR_LISTENER = "inbound"
OUTBOUND_LISTENER = "outbound"
#: Headers of a pipeline runtime's outbound calls: ``{app}/{stage index}``, or ``{model}/{version}`` (shadows).
STAGE_HEADER = "x-hydro-stage"
MODEL_VERSION_HEADER = "x-hydro-model-version"
NO_STAGE = (
    "no stage of application {app} is named by the x-hydro-stage header, nor a model version of it by "
    "x-hydro-model-version"
)
LOCAL_GRPC = "local|grpc"
LOCAL_HTTP = "local|http"

NO_ROUTE_REST = (
    "no application or deployed model version matches %REQ(:PATH)%; the manager's GET /api/v1/applications lists them"
)
#: A versioned REST path that no deployed model version's route took (an application has no versions).
NO_VERSION_REST = (
    "no deployed model version matches %REQ(:PATH)% (an application has no versions: /v2/models/{app}/infer "
    "addresses one); the manager's GET /api/v1/deployments lists the deployed versions"
)
NO_ROUTE_GRPC = (
    "no application or deployed model version named by the request (model_name, or the x-hydro-model request header); "
    "the manager's GET /api/v1/applications lists them"
)


def cluster_name(model: str, version: int) -> str:
    """The Envoy cluster of one model version's sidecars."""
    return f"model|{model}|{version}"


def pipeline_cluster_name(app: str) -> str:
    """The Envoy cluster of an application's pipeline runtimes' sidecars."""
    return f"pipeline|{app}"


#: The ingress retries a call to a pipeline only when it certainly never reached one: a pipeline that answered
#: has already called its stages, and a stage's error (503 for a stage that is down) is final, named by the pipeline.
PIPELINE_RETRIES = RetryPolicy(attempts=2, retry_on=["connect-failure", "refused-stream", "reset-before-request"])
#: Time the ingress gives a pipeline on top of its stages' own deadlines (its hops through two sidecars).
PIPELINE_SLACK_MS = 1000


@dataclass(frozen=True)
class NodeInfo:
    """What a proxy told us about itself in its bootstrap (node id and metadata)."""

    node_id: str
    role: str
    metadata: Mapping[str, object]

    @classmethod
    def from_node(cls, node: base_pb2.Node) -> NodeInfo:
        metadata = json_format.MessageToDict(node.metadata)
        return cls(node_id=node.id, role=str(metadata.get("role", "")), metadata=metadata)

    def text(self, key: str, default: str = "") -> str:
        return str(self.metadata.get(key, default))

    def port(self, key: str) -> int:
        value = self.metadata.get(key)
        if value is None:
            raise ValueError(f"node {self.node_id} has no {key} in its metadata")
        return int(str(value).split(".")[0])


def policies_of(topology: Topology, model: str, version: int) -> Policies:
    """The deployment's policies; the defaults for a version an application names but nobody deployed."""
    deployment = topology.deployments.get((model, version))
    return deployment.policies if deployment is not None else Policies()


def cluster_policies(policies: Policies) -> ClusterPolicies:
    """The policies that belong on the model version's ingress cluster."""
    return ClusterPolicies(
        circuit_breaker=policies.circuit_breaker,
        retry_budget_percent=policies.retries.budget_percent,
        outlier_detection=policies.outlier_detection,
        health_check=policies.health_check,
    )


def model_cluster(model: str, version: int, policies: Policies) -> cluster_pb2.Cluster:
    """The EDS cluster of one model version's sidecars, with its deployment's cluster policies; its metadata
    names the model version for the 503 it answers without a ready replica."""
    cluster = eds_cluster(cluster_name(model, version), policies=cluster_policies(policies))
    return serving(cluster, f"model version {model}:{version}")


def request_limits(model: str, version: int, policies: Policies) -> RequestLimits | None:
    """The rate limit and body size limit of one model version, None when it has neither."""
    if policies.rate_limit is None and policies.max_request_bytes is None:
        return None
    # Dots would split the stat name into more segments.
    stat_prefix = f"model_{model}_{version}".replace(".", "_")
    return RequestLimits(stat_prefix, policies.rate_limit, policies.max_request_bytes)


def route_policies(policies: Sequence[Policies]) -> RoutePolicies:
    """Route-level policies for a route to one or several model versions (an application's weighted variants).

    One route has one timeout and one retry policy, so variants' policies are merged towards the most permissive:
    the longest timeout and per-try timeout, the most attempts, every retry condition. A canary with a stricter
    policy than its main variant therefore gets the main variant's deadline, never a shorter one.
    """
    if not policies:
        policies = [Policies()]
    timeout = max(p.timeout_ms for p in policies)
    retrying = [p.retries for p in policies if p.retries.attempts > 0]
    if not retrying:
        return RoutePolicies(timeout_ms=timeout, retries=None)
    if len(retrying) == 1:
        return RoutePolicies(timeout_ms=timeout, retries=retrying[0])
    per_try = [p.per_try_timeout_ms for p in retrying]
    retry_on = list(dict.fromkeys(c for p in retrying for c in p.retry_on))
    merged = RetryPolicy(
        attempts=max(p.attempts for p in retrying),
        per_try_timeout_ms=None if None in per_try else max(t for t in per_try if t is not None),
        retry_on=retry_on,
    )
    return RoutePolicies(timeout_ms=timeout, retries=merged)


Named = list[tuple[str, Message | bytes]]


def model_clusters(topology: Topology, served: Iterable[tuple[str, int]], cache: BuildCache) -> tuple[Named, Named]:
    """The EDS cluster (with its deployment's policies) and the endpoints of each model version in ``served``."""
    clusters: Named = []
    endpoints: Named = []
    for model, version in sorted(served):
        name = cluster_name(model, version)
        deployment = topology.deployments.get((model, version))
        policies = policies_of(topology, model, version)
        cluster = cache.get(("cluster", name), (deployment,), _model_cluster_bytes, model, version, policies)
        clusters.append((name, cluster))
        instances = topology.instances.get((model, version), ())
        ready = topology.ready_endpoints(model, version)
        assignment = cache.get(("endpoints", name), instances, _endpoints_bytes, name, ready)
        endpoints.append((name, assignment))
    return clusters, endpoints


def ingress_snapshot(
    topology: Topology,
    node: NodeInfo,
    cache: BuildCache | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    tracing: EnvoyTracing | None = None,
) -> Snapshot:
    """Every application and deployed model version, routed to their sidecars.

    With a ``cache``, resources whose input records are the same objects as last time are reused, not rebuilt.
    ``max_request_bytes`` is the largest request body the ingress takes (413 / RESOURCE_EXHAUSTED beyond it).
    """
    cache = cache if cache is not None else BuildCache()
    served = set(topology.deployments)
    for app in topology.applications.values():
        served.update((v.model, v.version) for stage in app.stages for v in stage.variants)

    clusters, endpoints = model_clusters(topology, served, cache)
    pipeline_clusters, pipeline_endpoints = _pipeline_clusters(topology, cache)
    clusters.extend(pipeline_clusters)
    endpoints.extend(pipeline_endpoints)
    model_cluster_names = [name for name, _ in clusters]
    # Server-level gRPC calls go to whichever deployed model version has a healthy replica. Only deployments
    # count (the other clusters have no replicas), so that application changes never touch this cluster.
    deployed = [cluster_name(model, version) for model, version in sorted(topology.deployments)]
    if deployed:
        any_instance = serving(aggregate_cluster(ANY_INSTANCE_CLUSTER, deployed), "any deployed model version")
        clusters.append((ANY_INSTANCE_CLUSTER, any_instance))
    clusters.extend(collector_clusters(tracing))

    routes = [
        exact_direct_route("live", "/v2/health/live", 200, '{"live": true}'),
        exact_direct_route("ready", "/v2/health/ready", 200, '{"ready": true}'),
        *server_routes(ANY_INSTANCE_CLUSTER if deployed else None, max_request_bytes),
    ]
    for model, version in sorted(topology.deployments):
        deployment = topology.deployments[(model, version)]
        key = ("model-route", model, version)
        routes.extend(cache.get(key, (deployment,), _model_version_routes, model, version, deployment.policies))
    routes.append(undeployed_version_route(NO_VERSION_REST))
    for name in sorted(topology.applications):
        app = topology.applications[name]
        # A pipeline's route depends on every stage's deployments (its deadline), a direct one on the first's.
        variants = [v for stage in app.stages for v in stage.variants] if app.needs_pipeline else app.stages[0].variants
        inputs = (app, *(topology.deployments.get((v.model, v.version)) for v in variants))
        routes.extend(cache.get(("app-routes", name), inputs, _application_routes, topology, name))
    cache.sweep()
    routes.extend(grpc_fallback_routes(NO_ROUTE_GRPC, max_request_bytes))
    routes.append(direct_route("no-route", "/", 404, NO_ROUTE_REST))
    route_config = route_configuration(INGRESS_ROUTES, routes, ingress_response_headers(tracing))

    listener = http_listener(
        INGRESS_LISTENER,
        node.text("listen_address", "0.0.0.0"),
        node.port("listen_port"),
        rds_name=INGRESS_ROUTES,
        policy_filters=True,
        model_routing=True,
        buffer_limit_bytes=max_request_bytes,
        configure=tracing_hook(tracing, INGRESS_SERVICE, ingress=True),
    )
    return Snapshot.build(
        {
            CLUSTER: clusters,
            ENDPOINT: endpoints,
            LISTENER: [(INGRESS_LISTENER, listener)],
            ROUTE: [(INGRESS_ROUTES, route_config)],
        },
        eds_clusters=model_cluster_names,
        route_clusters=clusters_named_by(route_config),
        rds_names=[INGRESS_ROUTES],
    )


def _model_cluster_bytes(model: str, version: int, policies: Policies) -> bytes:
    return serialize(model_cluster(model, version, policies))


def _pipeline_cluster_bytes(app: str) -> bytes:
    cluster = eds_cluster(pipeline_cluster_name(app), policies=cluster_policies(Policies()))
    return serialize(serving(cluster, f"application {app}'s pipeline"))


def _endpoints_bytes(name: str, ready: Sequence[tuple[str, int]]) -> bytes:
    return serialize(load_assignment(name, ready))


def _model_version_routes(model: str, version: int, policies: Policies) -> list[route_components_pb2.Route]:
    args = (model, version, cluster_name(model, version), route_policies([policies]))
    limits = request_limits(model, version, policies)
    return [model_version_route(*args, limits), *model_version_grpc_routes(*args, limits)]


def stage_targets(topology: Topology, stage: Stage) -> tuple[list[WeightedTarget], RoutePolicies]:
    """The weighted clusters of a stage's variants, and the route policies merged from its live variants."""
    targets = []
    live_policies = []
    for v in stage.variants:
        policies = policies_of(topology, v.model, v.version)
        targets.append(
            WeightedTarget(cluster_name(v.model, v.version), v.weight, request_limits(v.model, v.version, policies))
        )
        if v.weight > 0:
            live_policies.append(policies)
    return targets, route_policies(live_policies)


def pipeline_timeout_ms(topology: Topology, app: Application) -> int:
    """The deadline of a whole pipeline: the sum of its stages' deadlines (each its live variants' longest)."""
    return sum(stage_targets(topology, stage)[1].timeout_ms for stage in app.stages)


def _application_routes(topology: Topology, name: str) -> list[route_components_pb2.Route]:
    app = topology.applications[name]
    if app.needs_pipeline:
        # Every stage is called by the pipeline runtime through its own sidecar, with each stage's policies there.
        target = WeightedTarget(pipeline_cluster_name(name), 100, _pipeline_body_limit(topology, app))
        policies = RoutePolicies(
            timeout_ms=pipeline_timeout_ms(topology, app) + PIPELINE_SLACK_MS, retries=PIPELINE_RETRIES
        )
        return list(application_routes(name, [target], policies))
    targets, policies = stage_targets(topology, app.stages[0])
    return list(application_routes(name, targets, policies))


def _pipeline_body_limit(topology: Topology, app: Application) -> RequestLimits | None:
    """The ingress's body limit for a pipeline: the largest that a live variant of its first stage takes, so that a
    body none of them would take is refused (413) before the pipeline reads it; None when one takes any. Rate
    limits are left to the stage routes of the pipeline's sidecar, where each call reaches one variant."""
    limits = [
        policies_of(topology, v.model, v.version).max_request_bytes for v in app.stages[0].variants if v.weight > 0
    ]
    if not limits or None in limits:
        return None
    return RequestLimits(f"pipeline_{app.name}".replace(".", "_"), None, max(limit for limit in limits if limit))


def _pipeline_clusters(topology: Topology, cache: BuildCache) -> tuple[Named, Named]:
    """The EDS cluster and endpoints of each application that needs a pipeline runtime (its ready replicas)."""
    clusters: Named = []
    endpoints: Named = []
    for name in sorted(topology.applications):
        if not topology.applications[name].needs_pipeline:
            continue
        cluster = pipeline_cluster_name(name)
        clusters.append((cluster, cache.get(("cluster", cluster), (), _pipeline_cluster_bytes, name)))
        pipelines = topology.pipelines.get(name, ())
        ready = topology.ready_pipelines(name)
        endpoints.append((cluster, cache.get(("endpoints", cluster), pipelines, _endpoints_bytes, cluster, ready)))
    return clusters, endpoints


def _inbound(
    node: NodeInfo, served_by: str, max_request_bytes: int, tracing: EnvoyTracing | None, service: str
) -> tuple[Named, listener_pb2.Listener]:
    """The local runtime's clusters, and the inbound listener that hands gRPC to its gRPC port, the rest to HTTP
    (traced as ``service`` with a collector)."""
    runtime_host = node.text("runtime_address", "127.0.0.1")
    route_config = route_configuration(
        "inbound",
        # No deadline of its own: the caller (the ingress route, from the deployment's timeout_ms) owns it, and a
        # shorter fixed one here would cut off calls the deployment allows.
        grpc_or_http_routes(LOCAL_GRPC, LOCAL_HTTP, timeout=0),
        {SERVED_BY_HEADER: served_by},
    )
    listener = http_listener(
        SIDECAR_LISTENER,
        node.text("inbound_address", "127.0.0.1"),
        node.port("inbound_port"),
        route_config=route_config,
        buffer_limit_bytes=max_request_bytes,
        configure=tracing_hook(tracing, service, ingress=False),
        exact_balance=True,
    )
    clusters: Named = [
        (LOCAL_GRPC, static_cluster(LOCAL_GRPC, runtime_host, node.port("runtime_grpc_port"), http2=True)),
        (LOCAL_HTTP, static_cluster(LOCAL_HTTP, runtime_host, node.port("runtime_http_port"), http2=False)),
        *collector_clusters(tracing),
    ]
    return clusters, listener


def sidecar_snapshot(
    node: NodeInfo, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, tracing: EnvoyTracing | None = None
) -> Snapshot:
    """One inbound listener that hands gRPC to the runtime's gRPC port and the rest to its HTTP port."""
    served_by = f"{node.text('model')}:{node.text('version')}/{node.text('instance')}"
    service = sidecar_service(node.text("model"), node.text("version"))
    clusters, listener = _inbound(node, served_by, max_request_bytes, tracing, service)
    return Snapshot.build(
        {CLUSTER: clusters, LISTENER: [(SIDECAR_LISTENER, listener)]},
        listener_clusters=[LOCAL_GRPC, LOCAL_HTTP],
    )


def outbound_routes_name(app: str) -> str:
    """The RDS name of a pipeline sidecar's outbound routes."""
    return f"outbound|{app}"


def pipeline_snapshot(
    topology: Topology,
    node: NodeInfo,
    cache: BuildCache | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    tracing: EnvoyTracing | None = None,
) -> Snapshot:
    """A pipeline runtime's sidecar: the inbound listener of a model sidecar, plus an outbound listener on
    loopback through which the runtime calls its stages.

    Outbound routes: ``x-hydro-stage: {app}/{i}`` goes to stage i's variants by weight (the ingress's clusters,
    EDS and policies: timeout, retries, circuit breaking, and each variant's rate limit and body limit),
    ``x-hydro-model-version: {model}/{version}`` to that exact version (shadows, which no limit holds back). The
    routes come over RDS, so a weight change never touches the listener and the runtime's open connection. An
    application not (or no longer) in etcd gets only a 404 route.
    """
    cache = cache if cache is not None else BuildCache()
    app_name = node.text("app")
    if not app_name:
        raise ValueError(f"pipeline node {node.node_id} has no app in its metadata")
    app = topology.applications.get(app_name)
    stages = app.stages if app is not None else []
    served = {(v.model, v.version) for stage in stages for v in stage.variants}
    served.update((s.model, s.version) for stage in stages for s in stage.shadows)
    clusters, endpoints = model_clusters(topology, served, cache)
    model_cluster_names = [name for name, _ in clusters]
    cache.sweep()

    routes = []
    for index, stage in enumerate(stages, start=1):
        targets, policies = stage_targets(topology, stage)
        routes.append(
            header_route(
                f"stage|{app_name}|{index}",
                STAGE_HEADER,
                f"{app_name}/{index}",
                targets,
                policies,
                # As the ingress does: the variant's runtime then takes the application's name as its own.
                {APPLICATION_HEADER: app_name},
            )
        )
    for model, version in sorted(served):
        target = WeightedTarget(cluster_name(model, version), 100)
        policies = route_policies([policies_of(topology, model, version)])
        routes.append(
            header_route(f"model|{model}|{version}", MODEL_VERSION_HEADER, f"{model}/{version}", [target], policies)
        )
    routes.append(direct_route("no-stage", "/", 404, NO_STAGE.format(app=app_name)))
    outbound_name = outbound_routes_name(app_name)
    outbound_config = route_configuration(outbound_name, routes)
    outbound = http_listener(
        OUTBOUND_LISTENER,
        node.text("outbound_address", "127.0.0.1"),
        node.port("outbound_port"),
        rds_name=outbound_name,
        # Each stage route's variants carry their deployment's rate limit and body limit, as on the ingress.
        policy_filters=True,
        buffer_limit_bytes=max_request_bytes,
        # The pipeline runtime passes its stage span's traceparent on: the outbound side joins the request's trace.
        configure=outbound_tracing_hook(tracing, sidecar_service(app_name, "pipeline")),
        exact_balance=True,
    )
    local_clusters, inbound = _inbound(
        node,
        f"{app_name}:pipeline/{node.text('instance')}",
        max_request_bytes,
        tracing,
        sidecar_service(app_name, "pipeline"),
    )
    return Snapshot.build(
        {
            CLUSTER: [*local_clusters, *clusters],
            ENDPOINT: endpoints,
            LISTENER: [(SIDECAR_LISTENER, inbound), (OUTBOUND_LISTENER, outbound)],
            ROUTE: [(outbound_name, outbound_config)],
        },
        eds_clusters=model_cluster_names,
        listener_clusters=[LOCAL_GRPC, LOCAL_HTTP],
        route_clusters=clusters_named_by(outbound_config),
        rds_names=[outbound_name],
    )


def snapshot_for(
    topology: Topology,
    node: NodeInfo,
    cache: BuildCache | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    tracing: EnvoyTracing | None = None,
) -> Snapshot:
    """The snapshot a node of any role should have; ValueError for a node we cannot serve.

    With ``tracing``, every proxy's connection manager traces to its collector (xds_control.tracing_config).
    """
    if node.role == "ingress":
        return ingress_snapshot(topology, node, cache, max_request_bytes, tracing)
    if node.role == "sidecar":
        return sidecar_snapshot(node, max_request_bytes, tracing)
    if node.role == "pipeline":
        return pipeline_snapshot(topology, node, cache, max_request_bytes, tracing)
    raise ValueError(f"node {node.node_id} has unknown role {node.role!r} (expected ingress, sidecar or pipeline)")
