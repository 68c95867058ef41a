"""xds_control with an INJECTED fault, for the NACK tests: ``python tests/xds_control/refusing_xds_control.py ARGS``
takes the arguments of ``python -m xds_control``.

While the topology holds an application named ``refused``, the ingress's route configuration gets a second
wildcard virtual host, which Envoy refuses ("only a single wildcard domain is permitted"). xds_control itself
leaves out every record it knows Envoy would refuse, so no etcd record makes a real NACK any more; the tests of
what happens on a NACK (recorded, not looped on, recovered from) get theirs through the Controller's ``translate``
seam, with a real Envoy doing the refusing.
"""

from __future__ import annotations

import sys

from envoy.config.route.v3 import route_pb2
from google.protobuf import any_pb2

from xds_control.__main__ import main
from xds_control.build_cache import BuildCache
from xds_control.resources.type_urls import LISTENER, ROUTE
from xds_control.snapshot import Snapshot, serialize
from xds_control.topology import Topology
from xds_control.tracing_config import EnvoyTracing
from xds_control.translate import NodeInfo, snapshot_for

#: The application whose presence turns the injection on.
REFUSED_APP = "refused"


def refusing_translate(
    topology: Topology, node: NodeInfo, cache: BuildCache, max_request_bytes: int, tracing: EnvoyTracing | None
) -> Snapshot:
    """The real translation, plus (INJECTED) a route configuration Envoy refuses while ``refused`` exists."""
    snapshot = snapshot_for(topology, node, cache, max_request_bytes, tracing)
    if node.role != "ingress" or REFUSED_APP not in topology.applications:
        return snapshot
    routes = []
    for name, packed in snapshot.items(ROUTE).items():
        config = route_pb2.RouteConfiguration()
        any_pb2.Any.FromString(packed).Unpack(config)
        config.virtual_hosts.add(name="injected-second-wildcard", domains=["*"])
        routes.append((name, serialize(config)))
    by_type = {type_url: list(items.items()) for type_url, items in snapshot.by_type.items()}
    by_type[ROUTE] = routes
    return Snapshot.build(
        by_type,
        eds_clusters=snapshot.eds_clusters,
        listener_clusters=snapshot.routed.get(LISTENER, ()),
        route_clusters=snapshot.routed.get(ROUTE, ()),
    )


if __name__ == "__main__":
    main(sys.argv[1:], translate=refusing_translate)
