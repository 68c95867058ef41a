"""Delta (incremental) ADS: the same snapshots as state-of-the-world ADS, sent one changed resource at a time.

``AdsServer`` (server.py) runs the stream and serves this protocol on ``DeltaAggregatedResources``; this module
is the per-stream state machine. The rules (DESIGN.md, "Control plane rules"), as they apply to delta:
- per-resource versions are content hashes (``Snapshot.resource_versions``), so a response carries only the
  resources whose version differs from what the proxy holds, and ``removed_resources`` for those that are gone;
- CDS and LDS are wildcard subscriptions (every resource of the snapshot); EDS and RDS are by name, and a name that
  does not exist is answered in ``removed_resources`` rather than left to time out;
- ``initial_resource_versions`` (a reconnecting proxy) count as held: only what differs is sent;
- one response per type is in flight at a time; ACK or NACK is read from ``error_detail`` of the request carrying
  its nonce; other nonces are stale (their subscription changes still apply: delta never repeats them);
- a NACKed resource version is never sent again;
- make-before-break: listeners and routes go out only once every cluster they name is acknowledged and its
  endpoints answered; every EDS cluster in a CDS response gets its endpoints again (a changed cluster warms until
  EDS answers); a cluster is removed only once the proxy's acknowledged listeners and routes no longer name it,
  and its endpoints only once the cluster is gone.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from envoy.service.discovery.v3 import discovery_pb2

from xds_control.resources import type_urls
from xds_control.snapshot import Snapshot, SnapshotCache
from xds_control.wire import encode_delta_discovery_response

if TYPE_CHECKING:
    # server.py imports this module to serve the delta method; the hooks are only needed as a type here.
    from xds_control.server import StreamCallbacks

log = logging.getLogger(__name__)

DELTA_ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"

#: Types Envoy subscribes to as a whole; the others it asks for by name.
WILDCARD_TYPES = frozenset({type_urls.CLUSTER, type_urls.LISTENER})
_ROUTING_TYPES = (type_urls.LISTENER, type_urls.ROUTE)
_WILDCARD = "*"
#: Stands for "removed" where a version is expected (a removal the proxy rejected).
_REMOVAL = ""

#: What one response changes: resource name -> version sent, or None for a removal.
Changes = dict[str, str | None]


@dataclass
class _InFlight:
    nonce: str
    system_version: str
    changes: Changes
    #: For listeners and routes: the clusters they name once the proxy applied this response (None: unknown).
    route_clusters: frozenset[str] | None = None


@dataclass
class _DeltaTypeState:
    subscribed: bool = False  # the proxy asked for this type on this stream
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    #: What the proxy holds, as far as it acknowledged (or told us on connecting): name -> version.
    held: dict[str, str] = field(default_factory=dict)
    in_flight: _InFlight | None = None
    #: Resource versions the proxy rejected (name -> version, or _REMOVAL): never sent again.
    rejected: dict[str, str] = field(default_factory=dict)
    #: Names subscribed to and not answered yet: they get an answer even when they do not exist.
    unanswered: set[str] = field(default_factory=set)
    #: Listeners and routes: clusters named by what the proxy holds (None: not known, e.g. just reconnected).
    route_clusters: frozenset[str] | None = None
    #: The snapshot version of this type that the proxy was last found to hold exactly: while neither changes,
    #: there is nothing to compare (a push for one endpoint does not walk every cluster and listener).
    in_sync_with: str | None = None
    #: EDS only: clusters a CDS response of this stream replaced before EDS was subscribed to. The versions a
    #: reconnecting proxy then reports for their endpoints were for the clusters being replaced: not held.
    renew: set[str] = field(default_factory=set)


class DeltaAdsStream:
    """The state of one proxy's delta stream. Owned by one task; nothing else touches it."""

    def __init__(self, node_id: str, cache: SnapshotCache, callbacks: StreamCallbacks) -> None:
        self.node_id = node_id
        self._cache = cache
        self._callbacks = callbacks
        self._types = {type_url: _DeltaTypeState() for type_url in type_urls.PUSH_ORDER}
        self._nonces = itertools.count(1)

    def handle_request(self, request: discovery_pb2.DeltaDiscoveryRequest) -> list[bytes]:
        """Apply one request from the proxy; return the responses to send, in push order."""
        log.debug(
            "%s -> delta %s nonce=%s +%d -%d initial=%d error=%s",
            self.node_id,
            _short(request.type_url),
            request.response_nonce,
            len(request.resource_names_subscribe),
            len(request.resource_names_unsubscribe),
            len(request.initial_resource_versions),
            request.HasField("error_detail"),
        )
        state = self._types.get(request.type_url)
        if state is None:
            log.warning("%s asked for unsupported type %s", self.node_id, request.type_url)
            return []
        state.in_sync_with = None
        if request.response_nonce:
            self._settle(request, state)
        self._subscribe(request, state)
        return self.push()

    def _settle(self, request: discovery_pb2.DeltaDiscoveryRequest, state: _DeltaTypeState) -> None:
        """ACK or NACK of the response in flight; any other nonce is stale and settles nothing."""
        in_flight = state.in_flight
        if in_flight is None or request.response_nonce != in_flight.nonce:
            log.debug("%s: stale nonce %s for %s", self.node_id, request.response_nonce, _short(request.type_url))
            return
        state.in_flight = None
        if request.HasField("error_detail"):
            error = request.error_detail.message
            for name in _culprits(in_flight.changes, error):
                state.rejected[name] = in_flight.changes[name] or _REMOVAL
            log.warning(
                "%s rejected %s %s (version %s): %s",
                self.node_id,
                _short(request.type_url),
                sorted(in_flight.changes),
                in_flight.system_version,
                error,
            )
            self._callbacks.on_nack(self.node_id, request.type_url, in_flight.system_version, error)
            return
        for name, version in in_flight.changes.items():
            if version is None:
                state.held.pop(name, None)
            else:
                state.held[name] = version
        if request.type_url in _ROUTING_TYPES:
            state.route_clusters = in_flight.route_clusters
        self._callbacks.on_ack(self.node_id, request.type_url, in_flight.system_version)

    def _subscribe(self, request: discovery_pb2.DeltaDiscoveryRequest, state: _DeltaTypeState) -> None:
        initial = {name: v for name, v in request.initial_resource_versions.items() if name not in state.renew}
        if not state.subscribed:
            state.subscribed = True
            # An empty first subscription to CDS or LDS is the legacy spelling of the wildcard.
            state.wildcard = request.type_url in WILDCARD_TYPES and not request.resource_names_subscribe
            state.held = dict(initial)
            state.renew.clear()
            if not request.initial_resource_versions:
                # A starting proxy waits (initial_fetch_timeout, 15 s) for a first answer even when there is
                # nothing to have; a reconnecting one already has its config and needs none.
                state.unanswered.add(_WILDCARD)
                if request.type_url in _ROUTING_TYPES:
                    state.route_clusters = frozenset()  # a fresh proxy routes nowhere yet
        for name in request.resource_names_subscribe:
            if name == _WILDCARD:
                state.wildcard = True
                continue
            state.names.add(name)
            if name in initial:
                state.held[name] = initial[name]
            else:
                # A (re-)subscription without a version asks for the resource again, e.g. for a re-created
                # cluster's endpoints.
                state.held.pop(name, None)
                state.unanswered.add(name)
        for name in request.resource_names_unsubscribe:
            if name == _WILDCARD:
                state.wildcard = False
                continue
            state.names.discard(name)
            state.unanswered.discard(name)
            if not state.wildcard:
                state.held.pop(name, None)

    def push(self) -> list[bytes]:
        """Send every subscribed type whose resources differ from what the proxy holds, in push order."""
        snapshot = self._cache.get(self.node_id)
        if snapshot is None:
            return []
        out = []
        for type_url in type_urls.PUSH_ORDER:
            state = self._types[type_url]
            if not state.subscribed or state.in_flight is not None:
                continue
            version = snapshot.versions.get(type_url, "")
            if state.in_sync_with == version:
                continue
            changes, complete = self._changes(type_url, snapshot)
            first_answer = _WILDCARD in state.unanswered
            if not (changes or first_answer) and complete:
                state.in_sync_with = version
            if type_url in _ROUTING_TYPES:
                if not changes and complete:
                    # Proxy and snapshot agree (e.g. it reconnected holding our versions): now we know its routes.
                    state.route_clusters = snapshot.routed.get(type_url, frozenset())
                if not (changes or first_answer) or not self._clusters_ready(snapshot):
                    continue
            if changes or first_answer:
                out.append(self._respond(type_url, state, changes, complete, snapshot))
        return out

    def _changes(self, type_url: str, snapshot: Snapshot) -> tuple[Changes, bool]:
        """What to send for one type, and whether the proxy matches the snapshot once it applied it."""
        state = self._types[type_url]
        current = snapshot.resource_versions.get(type_url, {})
        scope = set(state.names)
        if state.wildcard:
            scope |= current.keys() | state.held.keys()
        in_use = self._routed_clusters(snapshot) if type_url == type_urls.CLUSTER else frozenset()
        # Endpoints of a cluster the proxy still has stay until the cluster goes: removing them first would leave a
        # still-routed cluster empty.
        clusters_held = self._types[type_urls.CLUSTER].held if type_url == type_urls.ENDPOINT else {}
        changes: Changes = {}
        complete = True
        for name in scope:
            target = current.get(name)
            held = state.held.get(name)
            if target == held and name not in state.unanswered:
                continue
            rejected = state.rejected.get(name)
            if rejected is not None:
                if rejected == (target or _REMOVAL):
                    complete = False
                    continue
                del state.rejected[name]  # changed since: the new version may well be the fix
            if target is None and held is not None and (in_use is None or name in in_use or name in clusters_held):
                complete = False  # make-before-break: still routed to, or we cannot tell yet
                continue
            changes[name] = target
        return changes, complete

    def _routed_clusters(self, snapshot: Snapshot) -> frozenset[str] | None:
        """Clusters the proxy's listeners and routes (held or on their way) name; None when not known."""
        named: set[str] = set()
        for type_url in _ROUTING_TYPES:
            state = self._types[type_url]
            if type_url == type_urls.ROUTE and not state.subscribed and not snapshot.items(type_url):
                continue  # this proxy's listeners carry their routes inline
            if state.route_clusters is None:
                return None
            named |= state.route_clusters
            if state.in_flight is not None:
                if state.in_flight.route_clusters is None:
                    return None
                named |= state.in_flight.route_clusters
        return frozenset(named)

    def _clusters_ready(self, snapshot: Snapshot) -> bool:
        clusters = self._types[type_urls.CLUSTER].held
        endpoints = self._types[type_urls.ENDPOINT].held
        for name in snapshot.route_clusters:
            if name not in clusters:
                return False
            if name in snapshot.eds_clusters and name not in endpoints:
                return False
        return True

    def _respond(
        self, type_url: str, state: _DeltaTypeState, changes: Changes, complete: bool, snapshot: Snapshot
    ) -> bytes:
        nonce = str(next(self._nonces))
        system_version = snapshot.versions.get(type_url, "")
        in_flight = _InFlight(nonce, system_version, changes)
        if type_url in _ROUTING_TYPES:
            routed = snapshot.routed.get(type_url, frozenset())
            if complete:
                in_flight.route_clusters = routed
            elif state.route_clusters is not None:
                in_flight.route_clusters = state.route_clusters | routed  # part old, part new: both
        if type_url == type_urls.CLUSTER:
            self._renew_endpoints([name for name, version in changes.items() if version is not None], snapshot)
        state.in_flight = in_flight
        state.unanswered -= changes.keys()
        state.unanswered.discard(_WILDCARD)
        added = sorted(name for name, version in changes.items() if version is not None)
        removed = sorted(name for name, version in changes.items() if version is None)
        payload = encode_delta_discovery_response(
            system_version, type_url, nonce, [snapshot.delta_resource(type_url, name) for name in added], removed
        )
        log.debug(
            "%s <- delta %s nonce=%s resources=%d removed=%d",
            self.node_id,
            _short(type_url),
            nonce,
            len(added),
            len(removed),
        )
        self._callbacks.on_response(self.node_id, type_url, system_version, len(payload), len(added) + len(removed))
        return payload

    def _renew_endpoints(self, clusters: list[str], snapshot: Snapshot) -> None:
        """A new or changed EDS cluster warms until EDS answers for it: make sure EDS answers again."""
        eds = self._types[type_urls.ENDPOINT]
        eds.in_sync_with = None
        for name in clusters:
            if name not in snapshot.eds_clusters:
                continue
            eds.held.pop(name, None)
            if not eds.subscribed:
                eds.renew.add(name)
            if eds.in_flight is not None:
                # An answer already on its way went to the cluster being replaced; its ACK must not count.
                eds.in_flight.changes.pop(name, None)


def _culprits(changes: Changes, error: str) -> list[str]:
    """The resources of a rejected response to blame.

    Envoy rejects a response as a whole but names the resources it failed on (``Error adding/updating
    cluster(s) model|m|1: ...``); when it names some, only those are blocked and the rest go again. Otherwise
    every resource sent is blocked (or, for a response of removals only, every removal), so nothing loops.
    """
    named = [name for name in changes if name in error]
    if named:
        return named
    sent = [name for name, version in changes.items() if version is not None]
    return sent or list(changes)


def _short(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]
