"""EDS resources: the endpoints of a cluster."""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2

from xds_control.resources.core import socket_address


def load_assignment(cluster_name: str, endpoints: Sequence[tuple[str, int]]) -> endpoint_pb2.ClusterLoadAssignment:
    """The endpoints of one cluster, sorted so that equal sets serialize to equal bytes."""
    lb_endpoints = [
        endpoint_components_pb2.LbEndpoint(
            endpoint=endpoint_components_pb2.Endpoint(address=socket_address(host, port))
        )
        for host, port in sorted(endpoints)
    ]
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=cluster_name,
        endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=lb_endpoints)] if lb_endpoints else [],
    )
