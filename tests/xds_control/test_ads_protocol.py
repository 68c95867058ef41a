"""The ADS state machine, driven request by request; every response is decoded and checked."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from protos.topology.applications import Application, Stage, Variant
from protos.topology.deployments import Deployment
from protos.topology.instances import Instance
from protos.topology.policies import CircuitBreakerPolicy, Policies
from xds_control.resources.type_urls import CLUSTER, ENDPOINT, LISTENER, PUSH_ORDER, ROUTE, pack
from xds_control.server import AdsStream, StreamCallbacks
from xds_control.snapshot import SnapshotCache
from xds_control.topology import Topology
from xds_control.translate import NodeInfo, cluster_name, ingress_snapshot
from xds_control.wire import encode_discovery_response

NODE = "ingress-test"


class Recorder(StreamCallbacks):
    def __init__(self) -> None:
        self.nacks: list[tuple[str, str]] = []
        self.acks: list[tuple[str, str]] = []

    def on_nack(self, node_id: str, type_url: str, version: str, error: str) -> None:
        self.nacks.append((type_url, error))

    def on_ack(self, node_id: str, type_url: str, version: str) -> None:
        self.acks.append((type_url, version))


def _node_info() -> NodeInfo:
    metadata = struct_pb2.Struct()
    metadata.update({"role": "ingress", "listen_address": "127.0.0.1", "listen_port": 10000})
    return NodeInfo.from_node(base_pb2.Node(id=NODE, metadata=metadata))


def _topology(variants: dict[tuple[str, int], int], endpoints: dict[tuple[str, int], int] | None = None) -> Topology:
    app = Application(
        name="app",
        stages=[Stage(variants=[Variant(model=m, version=v, weight=w) for (m, v), w in variants.items()])],
    )
    instances = {
        key: (Instance(model=key[0], version=key[1], id=f"i{port}", node="n", address="127.0.0.1", port=port),)
        for key, port in (endpoints or {}).items()
    }
    return Topology(revision=1, applications={"app": app}, instances=instances)


def _decode(payload: bytes) -> discovery_pb2.DiscoveryResponse:
    response = discovery_pb2.DiscoveryResponse.FromString(payload)
    assert response.nonce, "every response carries a nonce"
    assert response.version_info, "every response carries a version"
    for resource in response.resources:
        assert resource.type_url == response.type_url, "resources match the response type"
    return response


class Proxy:
    """Plays Envoy's side: asks, acknowledges, rejects; remembers the last nonce per type."""

    def __init__(self, stream: AdsStream) -> None:
        self.stream = stream
        self.last: dict[str, discovery_pb2.DiscoveryResponse] = {}

    def ask(
        self, type_url: str, names: list[str] | None = None, version: str = ""
    ) -> list[discovery_pb2.DiscoveryResponse]:
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url, resource_names=names or [], version_info=version, node=base_pb2.Node(id=NODE)
        )
        return self._send(request)

    def ack(self, type_url: str, names: list[str] | None = None) -> list[discovery_pb2.DiscoveryResponse]:
        last = self.last[type_url]
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url,
            resource_names=names or [],
            version_info=last.version_info,
            response_nonce=last.nonce,
        )
        return self._send(request)

    def nack(self, type_url: str, accepted_version: str) -> list[discovery_pb2.DiscoveryResponse]:
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url,
            version_info=accepted_version,
            response_nonce=self.last[type_url].nonce,
            error_detail=status_pb2.Status(code=3, message="bad cluster"),
        )
        return self._send(request)

    def _send(self, request: discovery_pb2.DiscoveryRequest) -> list[discovery_pb2.DiscoveryResponse]:
        responses = [_decode(p) for p in self.stream.handle_request(request)]
        for response in responses:
            self.last[response.type_url] = response
        return responses

    def push(self) -> list[discovery_pb2.DiscoveryResponse]:
        responses = [_decode(p) for p in self.stream.push()]
        for response in responses:
            self.last[response.type_url] = response
        return responses

    def names(self, type_url: str) -> set[str]:
        response = self.last[type_url]
        if type_url == CLUSTER:
            return {cluster_pb2.Cluster.FromString(a.value).name for a in response.resources}
        return {endpoint_pb2.ClusterLoadAssignment.FromString(a.value).cluster_name for a in response.resources}


def _connected(topology: Topology) -> tuple[SnapshotCache, Proxy, Recorder]:
    cache = SnapshotCache()
    cache.set(NODE, ingress_snapshot(topology, _node_info()))
    recorder = Recorder()
    return cache, Proxy(AdsStream(NODE, cache, recorder)), recorder


def _warm_up(proxy: Proxy) -> None:
    """The order Envoy follows on start: CDS, EDS for its clusters, LDS, RDS, acknowledging each."""
    (_cds,) = proxy.ask(CLUSTER)
    assert proxy.ask(LISTENER) == [], "listeners wait until the clusters they route to are warm"
    clusters = sorted(proxy.names(CLUSTER))
    assert proxy.ack(CLUSTER) == []
    (_eds,) = proxy.ask(ENDPOINT, clusters)
    (lds,) = proxy.ack(ENDPOINT, clusters)
    assert lds.type_url == LISTENER, "the listener goes out once endpoints are acknowledged"
    (_rds,) = proxy.ask(ROUTE, ["ingress"])
    assert proxy.ack(LISTENER) == []
    assert proxy.ack(ROUTE, ["ingress"]) == []


def test_first_push_goes_clusters_endpoints_listeners_routes() -> None:
    _, proxy, recorder = _connected(_topology({("a", 1): 100}, {("a", 1): 7001}))
    _warm_up(proxy)
    assert {t for t, _ in recorder.acks} == set(PUSH_ORDER)


def test_stale_nonce_is_ignored() -> None:
    _, proxy, _ = _connected(_topology({("a", 1): 100}))
    proxy.ask(CLUSTER)
    stale = discovery_pb2.DiscoveryRequest(type_url=CLUSTER, response_nonce="does-not-exist", version_info="x")
    assert proxy.stream.handle_request(stale) == []


def test_unknown_endpoint_names_are_answered_empty() -> None:
    _, proxy, _ = _connected(_topology({("a", 1): 100}))
    (eds,) = proxy.ask(ENDPOINT, ["no-such-cluster"])
    (assignment,) = [endpoint_pb2.ClusterLoadAssignment.FromString(a.value) for a in eds.resources]
    assert assignment.cluster_name == "no-such-cluster"
    assert not assignment.endpoints


def test_nacked_version_is_not_sent_again_and_the_next_change_is() -> None:
    cache, proxy, recorder = _connected(_topology({("a", 1): 100}))
    _warm_up(proxy)
    accepted = proxy.last[CLUSTER].version_info
    cache.set(NODE, ingress_snapshot(_topology({("a", 1): 50, ("b", 1): 50}), _node_info()))
    cds = proxy.push()[0]
    assert cds.type_url == CLUSTER
    assert proxy.nack(CLUSTER, accepted) == [], "a rejected version is never re-sent"
    assert recorder.nacks == [(CLUSTER, "bad cluster")]
    assert proxy.push() == [], "nothing new, nothing sent: no NACK loop"
    cache.set(NODE, ingress_snapshot(_topology({("a", 1): 50, ("c", 1): 50}), _node_info()))
    fixed = proxy.push()[0]
    assert fixed.type_url == CLUSTER and fixed.version_info != cds.version_info


def test_removed_cluster_stays_until_routes_without_it_are_acknowledged() -> None:
    cache, proxy, _ = _connected(_topology({("a", 1): 50, ("b", 1): 50}))
    _warm_up(proxy)
    old = cluster_name("b", 1)
    cache.set(NODE, ingress_snapshot(_topology({("a", 1): 100}), _node_info()))
    pushed = proxy.push()
    assert [p.type_url for p in pushed] == [ROUTE], "routes change first; the cluster is still routed to"
    assert old in proxy.names(CLUSTER)
    cds = proxy.ack(ROUTE, ["ingress"])[0]
    assert cds.type_url == CLUSTER
    assert old not in proxy.names(CLUSTER), "removed once no acknowledged route names it"


def test_removed_cluster_keeps_its_endpoints_while_routes_name_it() -> None:
    cache, proxy, _ = _connected(_topology({("a", 1): 50, ("b", 1): 50}, {("a", 1): 7001, ("b", 1): 7002}))
    _warm_up(proxy)
    old = cluster_name("b", 1)
    cache.set(NODE, ingress_snapshot(_topology({("a", 1): 100}, {("a", 1): 7001}), _node_info()))
    pushed = proxy.push()
    assert [p.type_url for p in pushed] == [ROUTE], "neither the cluster nor its endpoints change before routes"
    cds = proxy.ack(ROUTE, ["ingress"])[0]
    assert cds.type_url == CLUSTER and old not in proxy.names(CLUSTER)


def test_new_cluster_is_warm_before_routes_name_it() -> None:
    cache, proxy, _ = _connected(_topology({("a", 1): 100}))
    _warm_up(proxy)
    cache.set(NODE, ingress_snapshot(_topology({("a", 1): 50, ("b", 1): 50}, {("b", 1): 7002}), _node_info()))
    pushed = proxy.push()
    assert [p.type_url for p in pushed] == [CLUSTER, ENDPOINT], "routes naming b wait for b"
    clusters = sorted(proxy.names(CLUSTER))
    assert proxy.ack(CLUSTER) == []
    (_eds,) = proxy.ask(ENDPOINT, clusters)
    assert cluster_name("b", 1) in proxy.names(ENDPOINT)
    (rds,) = proxy.ack(ENDPOINT, clusters)
    assert rds.type_url == ROUTE


def test_reconnecting_proxy_that_holds_current_versions_gets_nothing() -> None:
    cache, proxy, _ = _connected(_topology({("a", 1): 100}, {("a", 1): 7001}))
    _warm_up(proxy)
    held = {t: proxy.last[t].version_info for t in PUSH_ORDER}
    fresh = Proxy(AdsStream(NODE, cache, Recorder()))
    assert fresh.ask(CLUSTER, version=held[CLUSTER]) == []
    assert fresh.ask(ENDPOINT, sorted(proxy.names(ENDPOINT)), version=held[ENDPOINT]) == []
    assert fresh.ask(LISTENER, version=held[LISTENER]) == []
    assert fresh.ask(ROUTE, ["ingress"], version=held[ROUTE]) == []


def test_versions_are_identical_across_independent_builds() -> None:
    first = ingress_snapshot(_topology({("a", 1): 30, ("b", 2): 70}, {("a", 1): 1}), _node_info())
    second = ingress_snapshot(_topology({("b", 2): 70, ("a", 1): 30}, {("a", 1): 1}), _node_info())
    assert first.versions == second.versions
    # Equal because the content is equal, not because versions ignore it: every type has one, and new weights
    # give the routes (and only them) a new one.
    assert set(first.versions) == set(PUSH_ORDER) and all(first.versions.values())
    reweighted = ingress_snapshot(_topology({("a", 1): 40, ("b", 2): 60}, {("a", 1): 1}), _node_info())
    assert {t for t in PUSH_ORDER if reweighted.versions[t] != first.versions[t]} == {ROUTE}


def test_hand_encoded_response_parses_as_protobuf() -> None:
    any_bytes = pack(cluster_pb2.Cluster(name="x")).SerializeToString()
    payload = encode_discovery_response("v1", CLUSTER, "7", [any_bytes, any_bytes])
    response = discovery_pb2.DiscoveryResponse.FromString(payload)
    assert (response.version_info, response.type_url, response.nonce) == ("v1", CLUSTER, "7")
    assert [cluster_pb2.Cluster.FromString(a.value).name for a in response.resources] == ["x", "x"]


def _with_breaker(max_requests: int) -> Topology:
    """One deployed model version; its circuit breaker is part of its cluster, not of its endpoints or routes."""
    policies = Policies(circuit_breaker=CircuitBreakerPolicy(max_requests=max_requests))
    deployment = Deployment(model="a", version=1, replicas=1, policies=policies)
    instance = Instance(model="a", version=1, id="i1", node="n", address="127.0.0.1", port=7001)
    return Topology(revision=1, deployments={("a", 1): deployment}, instances={("a", 1): (instance,)})


def test_reconnecting_proxy_gets_endpoints_again_for_a_cluster_changed_meanwhile() -> None:
    cache, proxy, _ = _connected(_with_breaker(100))
    _warm_up(proxy)
    held = {t: proxy.last[t].version_info for t in PUSH_ORDER}
    clusters = sorted(proxy.names(ENDPOINT))
    cache.set(NODE, ingress_snapshot(_with_breaker(200), _node_info()))

    fresh = Proxy(AdsStream(NODE, cache, Recorder()))
    (cds,) = fresh.ask(CLUSTER, version=held[CLUSTER])
    assert cds.version_info != held[CLUSTER]
    eds = fresh.ask(ENDPOINT, clusters, version=held[ENDPOINT])
    assert [e.type_url for e in eds] == [ENDPOINT], "the changed cluster warms until EDS answers for it"
