"""The type URLs of the resources ADS serves, the order a push sends them in, and packing into ``Any``."""

from __future__ import annotations

from google.protobuf import any_pb2
from google.protobuf.message import Message

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

#: The order in which a push goes out (make-before-break: clusters and their endpoints before the listeners
#: and routes that name them).
PUSH_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)


def pack(message: Message) -> any_pb2.Any:
    """Wrap a message in Any, serialized deterministically (versions are hashes of these bytes)."""
    packed = any_pb2.Any()
    packed.type_url = "type.googleapis.com/" + message.DESCRIPTOR.full_name
    packed.value = message.SerializeToString(deterministic=True)
    return packed
