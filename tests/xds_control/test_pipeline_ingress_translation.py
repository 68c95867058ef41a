"""The ingress's routes to applications that need a pipeline runtime, and the direct ones that do not (no Envoy)."""

from __future__ import annotations

from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.buffer.v3 import buffer_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from protos.topology.applications import Application, ShadowVariant, Stage, Variant
from protos.topology.deployments import Deployment
from protos.topology.instances import Instance, PipelineInstance
from protos.topology.policies import Policies
from xds_control.resources.request_limits import BUFFER_FILTER, RATE_LIMIT_FILTER
from xds_control.resources.type_urls import CLUSTER, ENDPOINT, PUSH_ORDER, ROUTE
from xds_control.snapshot import Snapshot
from xds_control.topology import Topology
from xds_control.translate import INGRESS_ROUTES, PIPELINE_SLACK_MS, NodeInfo, ingress_snapshot

NODE = NodeInfo("ingress", "ingress", {"listen_port": 8080})


def _stage(model: str, shadows: list[ShadowVariant] | None = None) -> Stage:
    return Stage(variants=[Variant(model=model, version=1, weight=100)], shadows=shadows or [])


def _topology(pipelines: tuple[PipelineInstance, ...] = ()) -> Topology:
    slow = Policies(timeout_ms=5000)
    applications = {
        "shop": Application(name="shop", stages=[_stage("fe"), _stage("clf"), _stage("nn")]),
        "mirror": Application(name="mirror", stages=[_stage("clf", [ShadowVariant(model="clf", version=2)])]),
        "direct": Application(name="direct", stages=[_stage("clf")]),
    }
    deployments = {(m, 1): Deployment(model=m, version=1, replicas=1) for m in ("fe", "clf", "nn")}
    deployments[("clf", 1)] = Deployment(model="clf", version=1, replicas=1, policies=slow)
    instance = Instance(model="clf", version=1, id="c1", node="n", address="127.0.0.1", port=20001)
    return Topology(
        revision=3,
        deployments=deployments,
        applications=applications,
        instances={("clf", 1): (instance,)},
        pipelines={"shop": pipelines} if pipelines else {},
    )


def _pipeline(instance_id: str, port: int, state: str = "ready") -> PipelineInstance:
    return PipelineInstance.model_validate(
        {"app": "shop", "id": instance_id, "node": "n", "address": "127.0.0.1", "port": port, "spec_digest": "d"}
        | {"state": state}
    )


def _unpack(snapshot: Snapshot, type_url: str, name: str, message: Message) -> Message:
    packed = any_pb2.Any.FromString(snapshot.by_type[type_url][name])
    packed.Unpack(message)
    return message


def _routes(snapshot: Snapshot) -> dict[str, route_pb2.Route]:
    config = _unpack(snapshot, ROUTE, INGRESS_ROUTES, route_pb2.RouteConfiguration())
    assert isinstance(config, route_pb2.RouteConfiguration)
    return {route.name: route for route in config.virtual_hosts[0].routes}


def test_multi_stage_and_shadowed_applications_go_to_their_pipeline_cluster() -> None:
    routes = _routes(ingress_snapshot(_topology(), NODE))
    for app in ("shop", "mirror"):
        # REST by path, gRPC by header and by the model name in the request: all to the pipeline.
        named = [name for name in routes if name.startswith(f"app|{app}|")]
        assert len(named) >= 3, named
        for name in named:
            assert routes[name].route.cluster == f"pipeline|{app}", name
            headers = [(h.header.key, h.header.value) for h in routes[name].request_headers_to_add]
            assert ("x-hydro-application", app) in headers
    rest = routes["app|shop|rest"]
    assert rest.match.path_separated_prefix == "/v2/models/shop"
    # The pipeline's deadline is its stages' together, plus the hops; only calls that never reached it retry.
    assert rest.route.timeout.ToMilliseconds() == 5000 + 2 * Policies().timeout_ms + PIPELINE_SLACK_MS
    assert rest.route.retry_policy.retry_on == "connect-failure,refused-stream,reset-before-request"


def test_one_stage_application_without_shadows_keeps_direct_routing() -> None:
    routes = _routes(ingress_snapshot(_topology(), NODE))
    assert routes["app|direct|rest"].route.cluster == "model|clf|1"
    assert "pipeline|direct" not in ingress_snapshot(_topology(), NODE).by_type[CLUSTER]


def test_pipeline_endpoints_are_the_ready_pipeline_sidecars() -> None:
    snapshot = ingress_snapshot(_topology((_pipeline("p1", 21001), _pipeline("p2", 21002, "draining"))), NODE)
    assert {"pipeline|shop", "pipeline|mirror"} <= set(snapshot.by_type[CLUSTER])
    assignment = _unpack(snapshot, ENDPOINT, "pipeline|shop", endpoint_pb2.ClusterLoadAssignment())
    assert isinstance(assignment, endpoint_pb2.ClusterLoadAssignment)
    ports = [e.endpoint.address.socket_address.port_value for g in assignment.endpoints for e in g.lb_endpoints]
    assert ports == [21001]
    # Without replicas the cluster still exists, empty: the route answers "no healthy upstream", not 404.
    empty = _unpack(snapshot, ENDPOINT, "pipeline|mirror", endpoint_pb2.ClusterLoadAssignment())
    assert isinstance(empty, endpoint_pb2.ClusterLoadAssignment)
    assert not [e for g in empty.endpoints for e in g.lb_endpoints]


def test_a_new_pipeline_replica_changes_endpoints_only() -> None:
    before = ingress_snapshot(_topology((_pipeline("p1", 21001),)), NODE)
    after = ingress_snapshot(_topology((_pipeline("p1", 21001), _pipeline("p2", 21002))), NODE)
    assert {t for t in PUSH_ORDER if before.versions.get(t) != after.versions.get(t)} == {ENDPOINT}


def test_pipeline_records_are_read_from_etcd_keys() -> None:
    from protos.topology.keys import Keys

    keys = Keys("/t/")
    record = _pipeline("p1", 21001)
    topology = Topology.from_kvs(keys, {keys.pipeline("shop", "p1"): record.model_dump_json().encode()}, 5)
    assert topology.ready_pipelines("shop") == [("127.0.0.1", 21001)]


def test_a_pipelines_ingress_routes_take_the_largest_body_its_first_stage_takes() -> None:
    topology = _topology()
    two_variants = Stage(
        variants=[Variant(model="fe", version=1, weight=60), Variant(model="fe", version=2, weight=40)]
    )
    shop = Application(name="shop", stages=[two_variants, _stage("clf"), _stage("nn")])
    deployments = dict(topology.deployments)
    for version, limit in ((1, 4096), (2, 8192)):
        deployments[("fe", version)] = Deployment(
            model="fe", version=version, replicas=1, policies=Policies(max_request_bytes=limit)
        )
    limited = Topology(deployments=deployments, applications={"shop": shop})
    routes = _routes(ingress_snapshot(limited, NODE))
    for name in ("app|shop|rest", "app|shop|grpc"):
        configs = routes[name].typed_per_filter_config
        # A body limit only: rate limits hold on the pipeline sidecar's stage routes, per variant.
        assert BUFFER_FILTER in configs and RATE_LIMIT_FILTER not in configs, name
        per_route = buffer_pb2.BufferPerRoute()
        configs[BUFFER_FILTER].Unpack(per_route)
        assert per_route.buffer.max_request_bytes.value == 8192
    # A variant that takes any size lifts the limit; one with no weight does not count.
    deployments[("fe", 2)] = Deployment(model="fe", version=2, replicas=1)
    routes = _routes(ingress_snapshot(Topology(deployments=deployments, applications={"shop": shop}), NODE))
    assert BUFFER_FILTER not in routes["app|shop|rest"].typed_per_filter_config
    idle = Stage(variants=[Variant(model="fe", version=1, weight=100), Variant(model="fe", version=2, weight=0)])
    shop = Application(name="shop", stages=[idle, _stage("clf"), _stage("nn")])
    routes = _routes(ingress_snapshot(Topology(deployments=deployments, applications={"shop": shop}), NODE))
    assert BUFFER_FILTER in routes["app|shop|rest"].typed_per_filter_config
