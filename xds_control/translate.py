"""Translation of the desired topology into per-node snapshots: ingress and sidecar roles."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from xds_control import resources as r
from xds_control.snapshot import Snapshot
from xds_control.topology import Topology

INGRESS_LISTENER = "ingress"
INGRESS_ROUTES = "ingress"
SIDECAR_LISTENER = "inbound"
LOCAL_GRPC = "local|grpc"
LOCAL_HTTP = "local|http"

NO_ROUTE_REST = "no application or model version matches this path; the manager's GET /api/v1/applications lists them"
NO_ROUTE_GRPC = (
    "no application named by the x-hydro-model request header; set it to an application name "
    "(the manager's GET /api/v1/applications lists them)"
)


def cluster_name(model: str, version: int) -> str:
    """The Envoy cluster of one model version's sidecars."""
    return f"model|{model}|{version}"


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


def ingress_snapshot(topology: Topology, node: NodeInfo) -> Snapshot:
    """Every application and deployed model version, routed to their sidecars."""
    served = set(topology.deployments)
    for app in topology.applications.values():
        served.update((v.model, v.version) for stage in app.stages for v in stage.variants)

    clusters: list[tuple[str, Message]] = []
    endpoints: list[tuple[str, Message]] = []
    for model, version in sorted(served):
        name = cluster_name(model, version)
        clusters.append((name, r.eds_cluster(name)))
        endpoints.append((name, r.load_assignment(name, topology.ready_endpoints(model, version))))

    routes = [
        r.exact_direct_route("live", "/v2/health/live", 200, "live"),
        r.exact_direct_route("ready", "/v2/health/ready", 200, "ready"),
    ]
    for model, version in sorted(topology.deployments):
        routes.append(r.model_version_route(model, version, cluster_name(model, version)))
    for name in sorted(topology.applications):
        first_stage = topology.applications[name].stages[0]
        targets = [r.WeightedTarget(cluster_name(v.model, v.version), v.weight) for v in first_stage.variants]
        routes.extend(r.application_routes(name, targets))
    routes.append(r.direct_route("no-grpc-route", r.GRPC_SERVICE_PREFIX, 404, NO_ROUTE_GRPC))
    routes.append(r.direct_route("no-route", "/", 404, NO_ROUTE_REST))
    route_config = r.route_configuration(INGRESS_ROUTES, routes)

    listener = r.http_listener(
        INGRESS_LISTENER,
        node.text("listen_address", "0.0.0.0"),
        node.port("listen_port"),
        rds_name=INGRESS_ROUTES,
    )
    return Snapshot.build(
        {
            r.CLUSTER: clusters,
            r.ENDPOINT: endpoints,
            r.LISTENER: [(INGRESS_LISTENER, listener)],
            r.ROUTE: [(INGRESS_ROUTES, route_config)],
        },
        eds_clusters=[name for name, _ in clusters],
        route_clusters=r.clusters_named_by(route_config),
        rds_names=[INGRESS_ROUTES],
    )


def sidecar_snapshot(node: NodeInfo) -> Snapshot:
    """One inbound listener that hands gRPC to the runtime's gRPC port and the rest to its HTTP port."""
    runtime_host = node.text("runtime_address", "127.0.0.1")
    served_by = f"{node.text('model')}:{node.text('version')}/{node.text('instance')}"
    route_config = r.route_configuration(
        "inbound", r.grpc_or_http_routes(LOCAL_GRPC, LOCAL_HTTP), {r.SERVED_BY_HEADER: served_by}
    )
    listener = r.http_listener(
        SIDECAR_LISTENER,
        node.text("inbound_address", "127.0.0.1"),
        node.port("inbound_port"),
        route_config=route_config,
    )
    return Snapshot.build(
        {
            r.CLUSTER: [
                (
                    LOCAL_GRPC,
                    r.static_cluster(LOCAL_GRPC, runtime_host, node.port("runtime_grpc_port"), http2=True),
                ),
                (
                    LOCAL_HTTP,
                    r.static_cluster(LOCAL_HTTP, runtime_host, node.port("runtime_http_port"), http2=False),
                ),
            ],
            r.LISTENER: [(SIDECAR_LISTENER, listener)],
        },
        listener_clusters=r.clusters_named_by(route_config),
    )


def snapshot_for(topology: Topology, node: NodeInfo) -> Snapshot:
    """The snapshot a node of any role should have; ValueError for a node we cannot serve."""
    if node.role == "ingress":
        return ingress_snapshot(topology, node)
    if node.role == "sidecar":
        return sidecar_snapshot(node)
    raise ValueError(f"node {node.node_id} has unknown role {node.role!r} (expected ingress or sidecar)")
