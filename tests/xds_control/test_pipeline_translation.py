"""Translation of an application into a pipeline sidecar's snapshot, without Envoy (the Envoy side is
tests/runtimes/test_pipeline.py)."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from protos.topology.applications import Application, ShadowVariant, Stage, Variant
from protos.topology.deployments import Deployment
from protos.topology.instances import Instance
from protos.topology.policies import Policies
from xds_control.resources.request_limits import BUFFER_FILTER, RATE_LIMIT_FILTER
from xds_control.resources.type_urls import CLUSTER, ENDPOINT, LISTENER, PUSH_ORDER, ROUTE
from xds_control.snapshot import Snapshot
from xds_control.topology import Topology
from xds_control.translate import NodeInfo, outbound_routes_name, pipeline_snapshot, snapshot_for

NODE = NodeInfo(
    "pipeline~shop~p1",
    "pipeline",
    {
        "app": "shop",
        "instance": "p1",
        "outbound_port": 15001,
        "inbound_port": 15000,
        "runtime_grpc_port": 9001,
        "runtime_http_port": 9000,
    },
)


def _topology(shadows: list[ShadowVariant] | None = None) -> Topology:
    stages = [
        Stage(variants=[Variant(model="fe", version=1, weight=100)]),
        Stage(
            variants=[Variant(model="clf", version=1, weight=70), Variant(model="clf", version=2, weight=30)],
            shadows=shadows or [],
        ),
    ]
    slow = Policies.model_validate({"timeout_ms": 5000, "retries": {"attempts": 3}})
    deployments = {
        ("fe", 1): Deployment(model="fe", version=1, replicas=1),
        ("clf", 1): Deployment(model="clf", version=1, replicas=1, policies=slow),
        ("clf", 2): Deployment(model="clf", version=2, replicas=1, policies=Policies(timeout_ms=2000)),
        ("other", 1): Deployment(model="other", version=1, replicas=1),
    }
    instance = Instance(model="clf", version=2, id="i", node="n", address="127.0.0.1", port=20002)
    return Topology(
        revision=7,
        deployments=deployments,
        applications={"shop": Application(name="shop", stages=stages)},
        instances={("clf", 2): (instance,)},
    )


def _unpack(snapshot: Snapshot, type_url: str, name: str, message: Message) -> Message:
    packed = any_pb2.Any.FromString(snapshot.by_type[type_url][name])
    packed.Unpack(message)
    return message


def _routes(snapshot: Snapshot) -> dict[str, route_pb2.Route]:
    config = _unpack(snapshot, ROUTE, outbound_routes_name("shop"), route_pb2.RouteConfiguration())
    assert isinstance(config, route_pb2.RouteConfiguration)
    return {route.name: route for route in config.virtual_hosts[0].routes}


def test_stage_routes_pick_variants_by_weight_with_merged_policies() -> None:
    snapshot = pipeline_snapshot(_topology(), NODE)
    routes = _routes(snapshot)
    assert list(routes)[:2] == ["stage|shop|1", "stage|shop|2"]
    first = routes["stage|shop|1"]
    assert [(h.name, h.string_match.exact) for h in first.match.headers] == [("x-hydro-stage", "shop/1")]
    assert first.route.cluster == "model|fe|1"
    assert [(h.header.key, h.header.value) for h in first.request_headers_to_add] == [("x-hydro-application", "shop")]
    second = routes["stage|shop|2"].route
    weights = {c.name: c.weight.value for c in second.weighted_clusters.clusters}
    assert weights == {"model|clf|1": 70, "model|clf|2": 30}
    # The ingress's merge: the longest timeout and the most attempts of the live variants.
    assert second.timeout.ToMilliseconds() == 5000
    assert second.retry_policy.num_retries.value == 3


def test_only_the_applications_model_versions_get_clusters_and_endpoints() -> None:
    snapshot = pipeline_snapshot(_topology(), NODE)
    assert set(snapshot.by_type[CLUSTER]) == {"local|grpc", "local|http", "model|fe|1", "model|clf|1", "model|clf|2"}
    assert set(snapshot.by_type[ENDPOINT]) == {"model|fe|1", "model|clf|1", "model|clf|2"}
    cluster = _unpack(snapshot, CLUSTER, "model|clf|2", cluster_pb2.Cluster())
    assert isinstance(cluster, cluster_pb2.Cluster)
    assert cluster.type == cluster_pb2.Cluster.EDS


def test_shadows_get_clusters_and_a_route_by_exact_version() -> None:
    snapshot = pipeline_snapshot(_topology([ShadowVariant(model="clf", version=3)]), NODE)
    assert "model|clf|3" in snapshot.by_type[CLUSTER]
    routes = _routes(snapshot)
    shadow = routes["model|clf|3"]
    assert [(h.name, h.string_match.exact) for h in shadow.match.headers] == [("x-hydro-model-version", "clf/3")]
    assert shadow.route.cluster == "model|clf|3"
    # An undeployed shadow still gets the default policies (the cluster exists before its deployment).
    assert shadow.route.timeout.ToMilliseconds() == Policies().timeout_ms
    assert list(routes)[-1] == "no-stage"
    assert routes["no-stage"].direct_response.status == 404


def test_listeners_inbound_to_the_runtime_and_outbound_over_rds_on_loopback() -> None:
    snapshot = pipeline_snapshot(_topology(), NODE)
    outbound = _unpack(snapshot, LISTENER, "outbound", listener_pb2.Listener())
    assert isinstance(outbound, listener_pb2.Listener)
    assert outbound.address.socket_address.address == "127.0.0.1"
    assert outbound.address.socket_address.port_value == 15001
    manager = hcm_pb2.HttpConnectionManager()
    outbound.filter_chains[0].filters[0].typed_config.Unpack(manager)
    # Weights change over RDS: the listener, and the runtime's connection to it, stay as they are.
    assert manager.rds.route_config_name == "outbound|shop"
    # The stage routes' variants turn on their deployment's rate limit and body limit in these filters.
    assert [f.name for f in manager.http_filters] == [RATE_LIMIT_FILTER, BUFFER_FILTER, "envoy.filters.http.router"]
    inbound = _unpack(snapshot, LISTENER, "inbound", listener_pb2.Listener())
    assert isinstance(inbound, listener_pb2.Listener)
    assert inbound.address.socket_address.port_value == 15000
    # Both take few long-lived connections (the ingress workers', the runtime's): spread over Envoy's workers.
    for listener in (inbound, outbound):
        assert listener.connection_balance_config.HasField("exact_balance"), listener.name


def test_weight_change_touches_routes_only() -> None:
    before = pipeline_snapshot(_topology(), NODE)
    topology = _topology()
    app = topology.applications["shop"]
    stage = Stage(variants=[Variant(model="clf", version=1, weight=10), Variant(model="clf", version=2, weight=90)])
    changed = Topology(
        revision=8,
        deployments=topology.deployments,
        applications={"shop": app.model_copy(update={"stages": [app.stages[0], stage]})},
        instances=topology.instances,
    )
    after = pipeline_snapshot(changed, NODE)
    assert {t for t in PUSH_ORDER if before.versions.get(t) != after.versions.get(t)} == {ROUTE}


def test_missing_application_gives_only_the_not_found_route() -> None:
    snapshot = snapshot_for(Topology(), NODE)
    assert list(_routes(snapshot)) == ["no-stage"]
    assert set(snapshot.by_type[CLUSTER]) == {"local|grpc", "local|http"}


def test_pipeline_node_without_app_is_refused() -> None:
    node = NodeInfo("pipeline~x", "pipeline", {"outbound_port": 1, "inbound_port": 2})
    with pytest.raises(ValueError, match="no app in its metadata"):
        snapshot_for(Topology(), node)
