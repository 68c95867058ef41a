"""Prometheus metrics of the control plane, and the stream callbacks that feed them.

Served on their own loopback port (``--metrics-port``) so a scrape never competes with ADS streams.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from xds_control.server import StreamCallbacks

_BYTES_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def short_type(type_url: str) -> str:
    """``Cluster`` for ``type.googleapis.com/envoy.config.cluster.v3.Cluster``: readable label values."""
    return type_url.rsplit(".", 1)[-1]


class XdsMetrics:
    """Every metric of one xds_control process, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connected_proxies = Gauge(
            "hydro_xds_connected_proxies", "Proxies with an open ADS stream", ["role"], registry=r
        )
        self.responses = Counter("hydro_xds_responses_total", "Discovery responses sent", ["type"], registry=r)
        self.response_bytes = Histogram(
            "hydro_xds_response_bytes", "Size of one discovery response", ["type"], buckets=_BYTES_BUCKETS, registry=r
        )
        self.response_resources = Histogram(
            "hydro_xds_response_resources",
            "Resources in one discovery response (delta: added plus removed)",
            ["type"],
            buckets=(0, 1, 2, 5, 10, 100, 1000, 10000, 100000),
            registry=r,
        )
        self.acks = Counter("hydro_xds_acks_total", "Responses a proxy accepted", ["type"], registry=r)
        self.nacks = Counter("hydro_xds_nacks_total", "Responses a proxy rejected", ["type"], registry=r)
        self.snapshot_build_seconds = Histogram(
            "hydro_xds_snapshot_build_seconds",
            "Time to rebuild every connected proxy's snapshot after a topology change",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.convergence_seconds = Histogram(
            "hydro_xds_convergence_seconds",
            "From the first etcd event of a change to every affected proxy acknowledging it",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.convergence_abandoned = Counter(
            "hydro_xds_convergence_abandoned_total",
            "Changes whose convergence was not measured (a proxy rejected it, left, or took over a minute)",
            registry=r,
        )
        self.topology_revision = Gauge(
            "hydro_xds_topology_revision", "etcd revision of the served topology", registry=r
        )

    def serve(self, host: str, port: int) -> None:
        """Expose /metrics over HTTP on ``host:port`` (a daemon thread of prometheus_client)."""
        start_http_server(port, addr=host, registry=self.registry)


class MetricsCallbacks(StreamCallbacks):
    """Counts responses, their sizes, ACKs and NACKs per resource type."""

    def __init__(self, metrics: XdsMetrics) -> None:
        self._metrics = metrics

    def on_ack(self, node_id: str, type_url: str, version: str) -> None:
        self._metrics.acks.labels(short_type(type_url)).inc()

    def on_nack(self, node_id: str, type_url: str, version: str, error: str) -> None:
        self._metrics.nacks.labels(short_type(type_url)).inc()

    def on_response(self, node_id: str, type_url: str, version: str, size: int, resources: int) -> None:
        kind = short_type(type_url)
        self._metrics.responses.labels(kind).inc()
        self._metrics.response_bytes.labels(kind).observe(size)
        self._metrics.response_resources.labels(kind).observe(resources)
