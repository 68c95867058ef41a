"""Measures convergence: from the first etcd event of a change until every proxy it affects has ACKed it.

The controller says, after each topology change, which proxies got a different snapshot and for which resource
types (``expect``). The ADS streams then report what they sent and what came back. A proxy has converged when
every changed type got a response that the proxy acknowledged; a change has converged when all of its proxies
have. A NACK, a disconnect or a minute without convergence abandons the measurement (and is counted), so a
broken proxy cannot hold the histogram hostage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from xds_control.metrics import XdsMetrics
from xds_control.server import StreamCallbacks

#: A change still unconverged after this long is abandoned.
ABANDON_AFTER = 60.0


@dataclass
class _NodeWait:
    types: set[str]
    sent: dict[str, str] = field(default_factory=dict)


@dataclass
class _Change:
    started_at: float
    nodes: set[str]


class ConvergenceTracker(StreamCallbacks):
    """Stream callbacks plus ``expect``; observes ``hydro_xds_convergence_seconds``."""

    def __init__(self, metrics: XdsMetrics) -> None:
        self._metrics = metrics
        self._waits: dict[str, _NodeWait] = {}
        self._changes: dict[int, _Change] = {}

    def expect(self, revision: int, started_at: float, changed: dict[str, set[str]]) -> None:
        """Proxies in ``changed`` must ACK new versions of the listed type URLs for ``revision`` to converge."""
        self._expire()
        if not changed:
            return
        for node_id, types in changed.items():
            wait = self._waits.get(node_id)
            if wait is None:
                self._waits[node_id] = _NodeWait(set(types))
            else:
                # A newer change before the last converged: the proxy must now ACK the union.
                wait.types |= types
                for type_url in types:
                    wait.sent.pop(type_url, None)
        change = self._changes.setdefault(revision, _Change(started_at or time.monotonic(), set()))
        change.nodes |= changed.keys()

    def on_response(self, node_id: str, type_url: str, version: str, size: int, resources: int) -> None:
        wait = self._waits.get(node_id)
        if wait is not None and type_url in wait.types:
            wait.sent[type_url] = version

    def on_ack(self, node_id: str, type_url: str, version: str) -> None:
        wait = self._waits.get(node_id)
        if wait is None or wait.sent.get(type_url) != version:
            return
        wait.types.discard(type_url)
        wait.sent.pop(type_url, None)
        if not wait.types:
            del self._waits[node_id]
            self._node_done(node_id, converged=True)

    def on_nack(self, node_id: str, type_url: str, version: str, error: str) -> None:
        if self._waits.pop(node_id, None) is not None:
            self._node_done(node_id, converged=False)

    def on_stream_closed(self, node_id: str) -> None:
        if self._waits.pop(node_id, None) is not None:
            self._node_done(node_id, converged=False)

    def _node_done(self, node_id: str, converged: bool) -> None:
        now = time.monotonic()
        for revision, change in list(self._changes.items()):
            if node_id not in change.nodes:
                continue
            if not converged:
                self._metrics.convergence_abandoned.inc()
                del self._changes[revision]
                continue
            change.nodes.discard(node_id)
            if not change.nodes:
                self._metrics.convergence_seconds.observe(now - change.started_at)
                del self._changes[revision]

    def _expire(self) -> None:
        now = time.monotonic()
        for revision, change in list(self._changes.items()):
            if now - change.started_at > ABANDON_AFTER:
                self._metrics.convergence_abandoned.inc()
                del self._changes[revision]
                for node_id in change.nodes:
                    self._waits.pop(node_id, None)
