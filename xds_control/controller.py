"""Keeps every connected proxy's snapshot in step with the topology.

It is the NodeRegistry of the ADS server (proxies come and go) and the consumer of the etcd watch (topology
changes). Both run on the server's event loop, so the state below needs no lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from envoy.config.core.v3 import base_pb2

from xds_control.build_cache import BuildCache
from xds_control.convergence import ConvergenceTracker
from xds_control.metrics import XdsMetrics
from xds_control.push_spans import PushSpans
from xds_control.resources.request_limits import DEFAULT_MAX_REQUEST_BYTES
from xds_control.snapshot import InconsistentSnapshot, Snapshot, SnapshotCache
from xds_control.topology import Topology
from xds_control.tracing_config import EnvoyTracing
from xds_control.translate import NodeInfo, snapshot_for

log = logging.getLogger(__name__)

#: Builds one node's snapshot: topology, node, its build cache, the mesh's request size limit, tracing.
Translator = Callable[[Topology, NodeInfo, BuildCache, int, EnvoyTracing | None], Snapshot]


class Controller:
    """Builds snapshots for connected nodes from the latest topology."""

    def __init__(
        self,
        cache: SnapshotCache,
        metrics: XdsMetrics | None = None,
        convergence: ConvergenceTracker | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        tracing: EnvoyTracing | None = None,
        push_spans: PushSpans | None = None,
        translate: Translator = snapshot_for,
    ) -> None:
        self.cache = cache
        self._translate = translate
        self._push_spans = push_spans
        self.max_request_bytes = max_request_bytes
        self.tracing = tracing
        self._metrics = metrics
        self._convergence = convergence
        # One cache per node: sweeping after a build must not drop what another node's build still uses.
        self._build_caches: dict[str, BuildCache] = {}
        self.topology = Topology()
        self.topology_loaded = False
        self._nodes: dict[str, NodeInfo] = {}
        self._streams: dict[str, int] = {}

    def node_connected(self, node: base_pb2.Node) -> None:
        info = NodeInfo.from_node(node)
        self._nodes[info.node_id] = info
        self._streams[info.node_id] = self._streams.get(info.node_id, 0) + 1
        if self.topology_loaded:
            self._rebuild(info)

    def node_disconnected(self, node_id: str) -> None:
        remaining = self._streams.get(node_id, 1) - 1
        if remaining > 0:
            self._streams[node_id] = remaining
            return
        self._streams.pop(node_id, None)
        self._nodes.pop(node_id, None)
        self.cache.clear(node_id)
        self._build_caches.pop(node_id, None)

    def apply(self, topology: Topology) -> None:
        """Rebuild every connected node's snapshot from ``topology`` (one consistent etcd cut)."""
        started = time.perf_counter()
        self.topology = topology
        self.topology_loaded = True
        changed: dict[str, set[str]] = {}
        for info in list(self._nodes.values()):
            before = self.cache.get(info.node_id)
            after = self._rebuild(info, topology.writes)
            if before is not None and after is not None:
                types = {t for t, version in after.versions.items() if before.versions.get(t) != version}
                if types:
                    changed[info.node_id] = types
        if self._metrics is not None:
            self._metrics.snapshot_build_seconds.observe(time.perf_counter() - started)
            self._metrics.topology_revision.set(topology.revision)
        if self._convergence is not None:
            self._convergence.expect(topology.revision, topology.observed_at, changed)

    def set_tracing(self, tracing: EnvoyTracing | None) -> None:
        """Turn every proxy's tracing on (to ``tracing``'s collector) or off, and push it.

        xds_control turns it off while the collector does not answer: spans nobody receives would cost every
        request in every proxy.
        """
        if tracing == self.tracing:
            return
        self.tracing = tracing
        log.info("proxies' tracing %s", f"on, to {tracing.collector}" if tracing else "off")
        if self.topology_loaded:
            for info in list(self._nodes.values()):
                self._rebuild(info)

    def _rebuild(self, info: NodeInfo, writes: tuple[str, ...] = ()) -> Snapshot | None:
        """Build and publish ``info``'s snapshot; ``writes`` are the manager writes the topology brings in."""
        started_ns = time.time_ns() if self._push_spans is not None else 0
        before = self.cache.get(info.node_id)
        try:
            build_cache = self._build_caches.setdefault(info.node_id, BuildCache())
            snapshot = self._translate(self.topology, info, build_cache, self.max_request_bytes, self.tracing)
        except (ValueError, InconsistentSnapshot) as exc:
            # Keep the node on its last good snapshot; a broken topology must not reach any proxy.
            log.error("not updating %s at revision %d: %s", info.node_id, self.topology.revision, exc)
            return None
        except Exception:
            # A bug in translation (no input known to cause one) must stall this node only: raised out of apply(),
            # it would stop the loop over nodes and the watch that calls it, so no proxy would get updates.
            log.exception("not updating %s at revision %d: translation failed", info.node_id, self.topology.revision)
            # Its build cache may be half-updated: the next build starts from nothing.
            self._build_caches.pop(info.node_id, None)
            return None
        self.cache.set(info.node_id, snapshot)
        if self._push_spans is not None and (before is None or before.versions != snapshot.versions):
            self._push_spans.published(info, self.topology.revision, before, snapshot, writes, started_ns)
        return snapshot
