"""Wiring of the observers (metrics, proxy status, convergence) around the ADS server and the controller."""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.core.v3 import base_pb2

from xds_control.metrics import XdsMetrics
from xds_control.server import NodeRegistry, StreamCallbacks
from xds_control.status import ProxyStatusWriter
from xds_control.translate import NodeInfo


class FanOutCallbacks(StreamCallbacks):
    """Calls every observer in turn; one failing observer never breaks a stream or the others."""

    def __init__(self, observers: Sequence[StreamCallbacks]) -> None:
        self._observers = list(observers)

    def on_ack(self, node_id: str, type_url: str, version: str) -> None:
        for observer in self._observers:
            observer.on_ack(node_id, type_url, version)

    def on_nack(self, node_id: str, type_url: str, version: str, error: str) -> None:
        for observer in self._observers:
            observer.on_nack(node_id, type_url, version, error)

    def on_response(self, node_id: str, type_url: str, version: str, size: int, resources: int) -> None:
        for observer in self._observers:
            observer.on_response(node_id, type_url, version, size, resources)

    def on_stream_closed(self, node_id: str) -> None:
        for observer in self._observers:
            observer.on_stream_closed(node_id)


class ObservedNodes(NodeRegistry):
    """The controller as NodeRegistry, plus the connected-proxies gauge and the proxy status records."""

    def __init__(self, inner: NodeRegistry, metrics: XdsMetrics, status: ProxyStatusWriter | None) -> None:
        self._inner = inner
        self._metrics = metrics
        self._status = status
        self._roles: dict[str, tuple[str, int]] = {}  # node id -> (role, open streams)

    def node_connected(self, node: base_pb2.Node) -> None:
        role = NodeInfo.from_node(node).role or "unknown"
        self._roles[node.id] = (role, self._roles.get(node.id, (role, 0))[1] + 1)
        self._metrics.connected_proxies.labels(role).inc()
        if self._status is not None:
            self._status.proxy_connected(node.id, role)
        self._inner.node_connected(node)

    def node_disconnected(self, node_id: str) -> None:
        role, streams = self._roles.get(node_id, ("unknown", 1))
        if streams > 1:
            self._roles[node_id] = (role, streams - 1)
        else:
            self._roles.pop(node_id, None)
        self._metrics.connected_proxies.labels(role).dec()
        self._inner.node_disconnected(node_id)
