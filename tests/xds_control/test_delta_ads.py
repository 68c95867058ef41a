"""Delta ADS over a real gRPC stream: a grpc.aio client plays Envoy against AdsServer's DeltaAggregatedResources.

"Nothing else was sent" is checked without waiting on time: the client subscribes to an endpoint name that does
not exist, which the server must answer (as removed); responses on a stream keep their order, so if the next
response is that answer, nothing was sent before it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Mapping

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from protos.topology.applications import Application, Stage, Variant
from protos.topology.instances import Instance
from xds_control.delta_server import DELTA_ADS_METHOD
from xds_control.resources.clusters import eds_cluster
from xds_control.resources.endpoints import load_assignment
from xds_control.resources.type_urls import CLUSTER, ENDPOINT, LISTENER, PUSH_ORDER, ROUTE, pack
from xds_control.server import AdsServer, StreamCallbacks
from xds_control.snapshot import Snapshot, SnapshotCache
from xds_control.topology import Topology
from xds_control.translate import INGRESS_ROUTES, NodeInfo, cluster_name, ingress_snapshot
from xds_control.wire import encode_delta_discovery_response, encode_delta_resource

NODE = "ingress-delta"
READ_TIMEOUT = 5.0


class Recorder(StreamCallbacks):
    def __init__(self) -> None:
        self.acks: list[tuple[str, str]] = []
        self.nacks: list[tuple[str, str]] = []

    def on_ack(self, node_id: str, type_url: str, version: str) -> None:
        self.acks.append((type_url, version))

    def on_nack(self, node_id: str, type_url: str, version: str, error: str) -> None:
        self.nacks.append((type_url, error))


class Nodes:
    def __init__(self) -> None:
        self.connected: list[str] = []

    def node_connected(self, node: base_pb2.Node) -> None:
        self.connected.append(node.id)

    def node_disconnected(self, node_id: str) -> None:
        self.connected.remove(node_id)


def _node() -> base_pb2.Node:
    metadata = struct_pb2.Struct()
    metadata.update({"role": "ingress", "listen_address": "127.0.0.1", "listen_port": 10000})
    return base_pb2.Node(id=NODE, metadata=metadata)


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


def _snapshot(topology: Topology) -> Snapshot:
    return ingress_snapshot(topology, NodeInfo.from_node(_node()))


def _clusters_only(timeouts: Mapping[str, float]) -> Snapshot:
    """Clusters (with their endpoints) and nothing routed: a cluster's content changes with its timeout."""
    return Snapshot.build(
        {
            CLUSTER: [(name, eds_cluster(name, connect_timeout=t)) for name, t in timeouts.items()],
            ENDPOINT: [(name, load_assignment(name, [])) for name in timeouts],
        },
        eds_clusters=list(timeouts),
    )


class Envoy:
    """Plays Envoy's side of one delta stream; remembers the last response per type."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self.call = call
        self.last: dict[str, discovery_pb2.DeltaDiscoveryResponse] = {}
        self._probes = itertools.count(1)
        self._first = True

    async def send(
        self,
        type_url: str,
        subscribe: list[str] | None = None,
        unsubscribe: list[str] | None = None,
        initial: Mapping[str, str] | None = None,
        nonce: str = "",
        error: str | None = None,
    ) -> None:
        request = discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url,
            resource_names_subscribe=subscribe or [],
            resource_names_unsubscribe=unsubscribe or [],
            initial_resource_versions=dict(initial or {}),
            response_nonce=nonce,
        )
        if self._first:
            request.node.CopyFrom(_node())
            self._first = False
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        await self.call.write(request)

    async def read(self) -> discovery_pb2.DeltaDiscoveryResponse:
        response = await asyncio.wait_for(self.call.read(), READ_TIMEOUT)
        assert isinstance(response, discovery_pb2.DeltaDiscoveryResponse), f"stream ended: {response}"
        assert response.nonce, "every response carries a nonce"
        for resource in response.resources:
            assert resource.resource.type_url == response.type_url, "resources match the response type"
            assert resource.name and resource.version
        self.last[response.type_url] = response
        return response

    async def ack(self, type_url: str) -> None:
        await self.send(type_url, nonce=self.last[type_url].nonce)

    async def nack(self, type_url: str, error: str) -> None:
        await self.send(type_url, nonce=self.last[type_url].nonce, error=error)

    async def quiet(self) -> None:
        """Assert that the server sent nothing since the last read (see the module docstring)."""
        probe = f"probe-{next(self._probes)}"
        await self.send(ENDPOINT, subscribe=[probe])
        answer = await self.read()
        assert (answer.type_url, list(answer.removed_resources), len(answer.resources)) == (ENDPOINT, [probe], 0), (
            f"something was sent before the answer to the probe: {answer}"
        )
        await self.ack(ENDPOINT)
        await self.send(ENDPOINT, unsubscribe=[probe])

    async def warm_up(self, routes: bool = True) -> dict[str, dict[str, str]]:
        """Envoy's start: CDS and LDS wildcard, EDS for the clusters, RDS; returns versions held by type.

        Without ``routes`` the snapshot has no listeners: LDS gets its (empty) first answer right after CDS.
        """
        await self.send(CLUSTER)
        await self.send(LISTENER)
        cds = await self.read()
        assert cds.type_url == CLUSTER, "clusters first; listeners wait until the clusters are warm"
        clusters = sorted(res.name for res in cds.resources)
        await self.ack(CLUSTER)
        if not routes:
            empty = await self.read()
            assert (empty.type_url, len(empty.resources)) == (LISTENER, 0), "a first request is always answered"
            await self.ack(LISTENER)
        await self.send(ENDPOINT, subscribe=clusters)
        eds = await self.read()
        assert eds.type_url == ENDPOINT
        assert sorted(res.name for res in eds.resources) == clusters, "every cluster of the CDS push gets EDS"
        await self.ack(ENDPOINT)
        held = {t: {res.name: res.version for res in self.last[t].resources} for t in (CLUSTER, ENDPOINT)}
        if routes:
            lds = await self.read()
            assert lds.type_url == LISTENER, "the listener goes out once endpoints are acknowledged"
            await self.send(ROUTE, subscribe=[INGRESS_ROUTES])
            await self.ack(LISTENER)
            rds = await self.read()
            assert rds.type_url == ROUTE
            await self.ack(ROUTE)
            for t in (LISTENER, ROUTE):
                held[t] = {res.name: res.version for res in self.last[t].resources}
        return held


class Harness:
    def __init__(self, cache: SnapshotCache, recorder: Recorder, nodes: Nodes, port: int) -> None:
        self.cache = cache
        self.recorder = recorder
        self.nodes = nodes
        self.port = port
        self._channels: list[grpc.aio.Channel] = []

    async def connect(self) -> Envoy:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        self._channels.append(channel)
        call = channel.stream_stream(
            DELTA_ADS_METHOD,
            request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString,
        )()
        return Envoy(call)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    def publish(self, snapshot: Snapshot) -> None:
        self.cache.set(NODE, snapshot)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    cache = SnapshotCache()
    recorder = Recorder()
    nodes = Nodes()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((AdsServer(cache, nodes, recorder).rpc_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    h = Harness(cache, recorder, nodes, port)
    try:
        yield h
    finally:
        await h.close()
        await server.stop(grace=None)


async def test_initial_push_has_every_resource_with_its_content_hash(harness: Harness) -> None:
    snapshot = _snapshot(_topology({("a", 1): 30, ("b", 1): 70}, {("a", 1): 7001, ("b", 1): 7002}))
    harness.publish(snapshot)
    envoy = await harness.connect()
    held = await envoy.warm_up()
    assert held == {t: dict(snapshot.resource_versions[t]) for t in PUSH_ORDER}
    assert set(held[CLUSTER]) == {cluster_name("a", 1), cluster_name("b", 1)}
    cds = envoy.last[CLUSTER]
    assert cds.system_version_info == snapshot.versions[CLUSTER]
    assert not cds.removed_resources
    names = {cluster_pb2.Cluster.FromString(res.resource.value).name for res in cds.resources}
    assert names == set(held[CLUSTER])
    await envoy.quiet()  # also: the server has read every ACK
    assert {t for t, _ in harness.recorder.acks} == set(PUSH_ORDER)
    assert harness.nodes.connected == [NODE]


async def test_one_endpoint_change_sends_exactly_one_resource(harness: Harness) -> None:
    variants = {("a", 1): 30, ("b", 1): 30, ("c", 1): 40}
    harness.publish(_snapshot(_topology(variants, {("a", 1): 7001, ("b", 1): 7002, ("c", 1): 7003})))
    envoy = await harness.connect()
    await envoy.warm_up()
    harness.publish(_snapshot(_topology(variants, {("a", 1): 7001, ("b", 1): 7999, ("c", 1): 7003})))
    eds = await envoy.read()
    assert eds.type_url == ENDPOINT
    assert [res.name for res in eds.resources] == [cluster_name("b", 1)]
    assert not eds.removed_resources
    assignment = endpoint_pb2.ClusterLoadAssignment.FromString(eds.resources[0].resource.value)
    ports = [e.endpoint.address.socket_address.port_value for e in assignment.endpoints[0].lb_endpoints]
    assert ports == [7999]
    await envoy.ack(ENDPOINT)
    await envoy.quiet()


async def test_removed_cluster_is_announced_after_routes_stop_naming_it(harness: Harness) -> None:
    harness.publish(_snapshot(_topology({("a", 1): 50, ("b", 1): 50})))
    envoy = await harness.connect()
    await envoy.warm_up()
    gone = cluster_name("b", 1)
    harness.publish(_snapshot(_topology({("a", 1): 100})))
    rds = await envoy.read()
    assert rds.type_url == ROUTE, "routes change first: the cluster is still routed to"
    await envoy.quiet()  # in particular: neither the cluster nor its endpoints removed yet
    await envoy.ack(ROUTE)
    cds = await envoy.read()
    assert (cds.type_url, list(cds.removed_resources), len(cds.resources)) == (CLUSTER, [gone], 0)
    await envoy.ack(CLUSTER)
    eds = await envoy.read()
    assert (eds.type_url, list(eds.removed_resources)) == (ENDPOINT, [gone]), "endpoints go after the cluster"
    await envoy.ack(ENDPOINT)
    await envoy.quiet()


async def test_new_cluster_is_warm_before_routes_name_it(harness: Harness) -> None:
    harness.publish(_snapshot(_topology({("a", 1): 100})))
    envoy = await harness.connect()
    await envoy.warm_up()
    added = cluster_name("b", 1)
    harness.publish(_snapshot(_topology({("a", 1): 50, ("b", 1): 50}, {("b", 1): 7002})))
    cds = await envoy.read()
    assert [res.name for res in cds.resources] == [added]
    await envoy.ack(CLUSTER)
    await envoy.quiet()  # routes naming b wait for b's endpoints
    await envoy.send(ENDPOINT, subscribe=[added])
    eds = await envoy.read()
    assert [res.name for res in eds.resources] == [added]
    await envoy.ack(ENDPOINT)
    rds = await envoy.read()
    assert rds.type_url == ROUTE


async def test_changed_cluster_gets_its_unchanged_endpoints_again(harness: Harness) -> None:
    harness.publish(_clusters_only({"x": 1.0, "y": 1.0}))
    envoy = await harness.connect()
    await envoy.warm_up(routes=False)
    harness.publish(_clusters_only({"x": 2.0, "y": 1.0}))
    cds = await envoy.read()
    assert [res.name for res in cds.resources] == ["x"]
    eds = await envoy.read()
    assert [res.name for res in eds.resources] == ["x"], "a changed cluster warms until EDS answers for it"
    await envoy.ack(CLUSTER)
    await envoy.ack(ENDPOINT)
    await envoy.quiet()


async def test_first_request_is_answered_even_when_there_is_nothing(harness: Harness) -> None:
    harness.publish(_snapshot(Topology(revision=1)))
    envoy = await harness.connect()
    await envoy.send(CLUSTER)
    cds = await envoy.read()
    assert (cds.type_url, len(cds.resources), len(cds.removed_resources)) == (CLUSTER, 0, 0), (
        "Envoy would wait its initial fetch timeout (15 s) for it"
    )


async def test_explicit_wildcard_and_resubscription(harness: Harness) -> None:
    harness.publish(_clusters_only({"x": 1.0, "y": 1.0}))
    envoy = await harness.connect()
    await envoy.send(CLUSTER, subscribe=["*"])
    cds = await envoy.read()
    assert sorted(res.name for res in cds.resources) == ["x", "y"], "'*' subscribes to every cluster"
    await envoy.ack(CLUSTER)
    await envoy.send(ENDPOINT, subscribe=["x"])
    assert [res.name for res in (await envoy.read()).resources] == ["x"]
    await envoy.ack(ENDPOINT)
    await envoy.send(ENDPOINT, subscribe=["x"])
    again = await envoy.read()
    assert [res.name for res in again.resources] == ["x"], "subscribing again without a version asks again"
    await envoy.ack(ENDPOINT)
    await envoy.quiet()


async def test_unknown_names_are_answered_as_removed(harness: Harness) -> None:
    harness.publish(_snapshot(_topology({("a", 1): 100})))
    envoy = await harness.connect()
    await envoy.send(ENDPOINT, subscribe=["no-such-cluster", cluster_name("a", 1)])
    eds = await envoy.read()
    assert list(eds.removed_resources) == ["no-such-cluster"]
    assert [res.name for res in eds.resources] == [cluster_name("a", 1)]


async def test_nacked_version_is_not_sent_again_and_the_fix_is(harness: Harness) -> None:
    harness.publish(_clusters_only({"x": 1.0}))
    envoy = await harness.connect()
    await envoy.warm_up(routes=False)
    harness.publish(_clusters_only({"x": 1.0, "bad": 1.0}))
    cds = await envoy.read()
    assert [res.name for res in cds.resources] == ["bad"]
    await envoy.nack(CLUSTER, "Error adding/updating cluster(s) bad: invalid")
    await envoy.quiet()  # no NACK loop
    assert harness.recorder.nacks == [(CLUSTER, "Error adding/updating cluster(s) bad: invalid")]

    harness.publish(_clusters_only({"x": 1.0, "bad": 1.0, "other": 1.0}))
    cds = await envoy.read()
    assert [res.name for res in cds.resources] == ["other"], "an unrelated change does not bring the rejected one"
    await envoy.ack(CLUSTER)
    harness.publish(_clusters_only({"x": 1.0, "bad": 3.0, "other": 1.0}))
    fixed = await envoy.read()
    assert [res.name for res in fixed.resources] == ["bad"], "the fix (a new version) goes out"
    assert fixed.resources[0].version != cds.resources[0].version


async def test_nack_without_names_blocks_the_whole_response(harness: Harness) -> None:
    harness.publish(_clusters_only({"x": 1.0}))
    envoy = await harness.connect()
    await envoy.warm_up(routes=False)
    harness.publish(_clusters_only({"x": 2.0, "y": 1.0}))
    cds = await envoy.read()
    assert sorted(res.name for res in cds.resources) == ["x", "y"]
    eds = await envoy.read()  # x changed: its endpoints again; y's are asked for once Envoy has y
    assert [res.name for res in eds.resources] == ["x"]
    await envoy.ack(ENDPOINT)
    await envoy.nack(CLUSTER, "something went wrong")
    await envoy.quiet()


async def test_stale_nonce_is_ignored(harness: Harness) -> None:
    harness.publish(_clusters_only({"x": 1.0}))
    envoy = await harness.connect()
    await envoy.send(CLUSTER)
    cds = await envoy.read()
    await envoy.send(CLUSTER, nonce="does-not-exist", error="a NACK of something never sent")
    await envoy.quiet()
    assert harness.recorder.nacks == [], "a stale NACK is not recorded"
    await envoy.send(CLUSTER, nonce="does-not-exist")
    await envoy.quiet()
    assert [t for t, _ in harness.recorder.acks if t == CLUSTER] == [], "nor is a stale ACK"
    await envoy.send(CLUSTER, nonce=cds.nonce)
    await envoy.quiet()
    assert (CLUSTER, cds.system_version_info) in harness.recorder.acks


async def test_reconnect_with_initial_versions_sends_only_what_differs(harness: Harness) -> None:
    variants = {("a", 1): 50, ("b", 1): 50}
    harness.publish(_snapshot(_topology(variants, {("a", 1): 7001, ("b", 1): 7002})))
    first = await harness.connect()
    held = await first.warm_up()
    await first.call.done_writing()

    again = await harness.connect()
    await again.send(CLUSTER, initial=held[CLUSTER])
    await again.send(ENDPOINT, subscribe=sorted(held[ENDPOINT]), initial=held[ENDPOINT])
    await again.send(LISTENER, initial=held[LISTENER])
    await again.send(ROUTE, subscribe=[INGRESS_ROUTES], initial=held[ROUTE])
    await again.quiet()

    harness.publish(_snapshot(_topology(variants, {("a", 1): 7001, ("b", 1): 7003})))
    eds = await again.read()
    assert [res.name for res in eds.resources] == [cluster_name("b", 1)]


async def test_reconnect_removes_what_the_proxy_should_no_longer_have(harness: Harness) -> None:
    harness.publish(_snapshot(_topology({("a", 1): 50, ("b", 1): 50})))
    first = await harness.connect()
    held = await first.warm_up()
    await first.call.done_writing()
    harness.publish(_snapshot(_topology({("a", 1): 100})))

    again = await harness.connect()
    await again.send(CLUSTER, initial=held[CLUSTER])
    await again.send(ENDPOINT, subscribe=sorted(held[ENDPOINT]), initial=held[ENDPOINT])
    await again.send(LISTENER, initial=held[LISTENER])
    await again.send(ROUTE, subscribe=[INGRESS_ROUTES], initial=held[ROUTE])
    rds = await again.read()
    assert rds.type_url == ROUTE, "what the proxy's routes name is unknown until it has ours: no removal before"
    await again.ack(ROUTE)
    cds = await again.read()
    assert list(cds.removed_resources) == [cluster_name("b", 1)]


def test_delta_resources_are_encoded_once_and_shared() -> None:
    snapshot = _snapshot(_topology({("a", 1): 100}, {("a", 1): 7001}))
    name = cluster_name("a", 1)
    assert snapshot.delta_resource(CLUSTER, name) is snapshot.delta_resource(CLUSTER, name)
    again = _snapshot(_topology({("a", 1): 100}, {("a", 1): 7001}))
    assert again.resource_versions == snapshot.resource_versions, "versions are content hashes"
    # ...of the content: the endpoint on another port changes that one resource's version and no other.
    moved = _snapshot(_topology({("a", 1): 100}, {("a", 1): 7002}))
    changed = {
        (type_url, resource)
        for type_url, versions in moved.resource_versions.items()
        for resource, version in versions.items()
        if snapshot.resource_versions[type_url].get(resource) != version
    }
    assert changed == {(ENDPOINT, name)}


def test_hand_encoded_delta_response_parses_as_protobuf() -> None:
    any_bytes = pack(cluster_pb2.Cluster(name="x")).SerializeToString()
    payload = encode_delta_discovery_response(
        "v1", CLUSTER, "7", [encode_delta_resource("x", "h1", any_bytes)], ["gone", "also-gone"]
    )
    response = discovery_pb2.DeltaDiscoveryResponse.FromString(payload)
    assert (response.system_version_info, response.type_url, response.nonce) == ("v1", CLUSTER, "7")
    assert list(response.removed_resources) == ["gone", "also-gone"]
    (resource,) = response.resources
    assert (resource.name, resource.version) == ("x", "h1")
    assert cluster_pb2.Cluster.FromString(resource.resource.value).name == "x"


async def test_reconnect_gets_endpoints_again_for_a_cluster_changed_meanwhile(harness: Harness) -> None:
    harness.publish(_clusters_only({"x": 1.0, "y": 1.0}))
    first = await harness.connect()
    held = await first.warm_up(routes=False)
    await first.call.done_writing()
    harness.publish(_clusters_only({"x": 2.0, "y": 1.0}))

    again = await harness.connect()
    await again.send(CLUSTER, initial=held[CLUSTER])
    cds = await again.read()
    assert [res.name for res in cds.resources] == ["x"]
    await again.send(ENDPOINT, subscribe=sorted(held[ENDPOINT]), initial=held[ENDPOINT])
    eds = await again.read()
    assert [res.name for res in eds.resources] == ["x"], "a changed cluster warms until EDS answers for it"
