"""Immutable per-node snapshots of Envoy resources, and the cache that hands them to ADS streams.

No gRPC here. A snapshot holds every resource already serialized (as the bytes of a ``google.protobuf.Any``),
so a resource is serialized once per version and the same bytes go to every stream that needs them.
Versions are hashes of those deterministic bytes: two control-plane replicas watching the same etcd hand out
identical versions for identical state, and a reconnecting Envoy that already has a version gets nothing.
Delta xDS uses one version per resource (``resource_versions``) and the resource wrapped in a delta ``Resource``
message (``delta_resource``), encoded on first use and then shared by every delta stream of the node.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from google.protobuf.message import Message

from xds_control.resources import type_urls
from xds_control.wire import encode_delta_resource

ResourceBytes = Mapping[str, bytes]


def version_of(items: ResourceBytes) -> str:
    """A content hash of named resources: equal sets give equal versions, in any process."""
    digest = hashlib.sha256()
    for name in sorted(items):
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(items[name])
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def resource_version(any_bytes: bytes) -> str:
    """The version of one resource: a hash of its deterministic serialization (the name is inside it)."""
    return hashlib.sha256(any_bytes).hexdigest()[:16]


def serialize(message: Message) -> bytes:
    """The deterministic bytes of ``message`` packed in an ``Any``: how every resource goes on the wire."""
    return type_urls.pack(message).SerializeToString(deterministic=True)


class InconsistentSnapshot(ValueError):
    """A snapshot names something it does not contain; publishing it would break a proxy."""


@dataclass(frozen=True)
class Snapshot:
    """Everything one Envoy should have: resources by type URL, then by name."""

    by_type: Mapping[str, ResourceBytes]
    #: Clusters that carry traffic only once EDS has answered for them.
    eds_clusters: frozenset[str] = frozenset()
    #: Clusters that listeners (inline routes) and route configurations send traffic to, by type URL.
    routed: Mapping[str, frozenset[str]] = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=dict)
    #: Per-resource versions by type URL, then by name (delta xDS).
    resource_versions: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    #: Delta ``Resource`` encodings made so far, by (type URL, name); filled on first use, never changed after.
    _delta: dict[tuple[str, str], bytes] = field(default_factory=dict, init=False, compare=False, repr=False)

    @classmethod
    def build(
        cls,
        messages: Mapping[str, Iterable[tuple[str, Message | bytes]]],
        *,
        eds_clusters: Iterable[str] = (),
        listener_clusters: Iterable[str] = (),
        route_clusters: Iterable[str] = (),
        rds_names: Iterable[str] = (),
    ) -> Snapshot:
        """Serialize each message once and check that every name referenced is present.

        A resource given as bytes is already a serialized ``Any`` (see ``serialize``) and is taken as is.
        """
        by_type: dict[str, dict[str, bytes]] = {type_url: {} for type_url in type_urls.PUSH_ORDER}
        for type_url, named in messages.items():
            for name, message in named:
                by_type[type_url][name] = message if isinstance(message, bytes) else serialize(message)
        snapshot = cls(
            by_type=by_type,
            eds_clusters=frozenset(eds_clusters),
            routed={
                type_urls.LISTENER: frozenset(listener_clusters),
                type_urls.ROUTE: frozenset(route_clusters),
            },
            versions={type_url: version_of(items) for type_url, items in by_type.items()},
            resource_versions={
                type_url: {name: resource_version(data) for name, data in items.items()}
                for type_url, items in by_type.items()
            },
        )
        snapshot._check(frozenset(rds_names))
        return snapshot

    def _check(self, rds_names: frozenset[str]) -> None:
        clusters = self.by_type[type_urls.CLUSTER].keys()
        missing = sorted(self.route_clusters - clusters)
        if missing:
            raise InconsistentSnapshot(f"routes name clusters that are not in the snapshot: {missing}")
        missing = sorted(self.eds_clusters - self.by_type[type_urls.ENDPOINT].keys())
        if missing:
            raise InconsistentSnapshot(f"EDS clusters without endpoints in the snapshot: {missing}")
        missing = sorted(rds_names - self.by_type[type_urls.ROUTE].keys())
        if missing:
            raise InconsistentSnapshot(f"listeners name route configurations that are not in the snapshot: {missing}")

    @property
    def route_clusters(self) -> frozenset[str]:
        """Every cluster that some listener or route sends traffic to."""
        return frozenset().union(*self.routed.values())

    def items(self, type_url: str) -> ResourceBytes:
        return self.by_type.get(type_url, {})

    def delta_resource(self, type_url: str, name: str) -> bytes:
        """The serialized delta ``Resource`` (name, version, resource) of one resource in this snapshot."""
        key = (type_url, name)
        encoded = self._delta.get(key)
        if encoded is None:
            version = self.resource_versions[type_url][name]
            encoded = self._delta[key] = encode_delta_resource(name, version, self.by_type[type_url][name])
        return encoded


Listener = Callable[[], None]


class SnapshotCache:
    """The current snapshot of every node, with change notification.

    Contract: only the controller calls ``set``/``clear``; ADS streams only read and listen. Everything runs on
    one asyncio event loop, so no locks; listeners must not block (they enqueue and return).
    """

    def __init__(self) -> None:
        self._snapshots: dict[str, Snapshot] = {}
        self._listeners: dict[str, set[Listener]] = {}

    def get(self, node_id: str) -> Snapshot | None:
        return self._snapshots.get(node_id)

    def set(self, node_id: str, snapshot: Snapshot) -> None:
        """Publish ``snapshot`` for ``node_id`` and tell its streams, unless nothing changed."""
        previous = self._snapshots.get(node_id)
        if previous is not None and previous.versions == snapshot.versions:
            return
        self._snapshots[node_id] = snapshot
        for listener in list(self._listeners.get(node_id, ())):
            listener()

    def clear(self, node_id: str) -> None:
        self._snapshots.pop(node_id, None)

    def node_ids(self) -> list[str]:
        return list(self._snapshots)

    def listen(self, node_id: str, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` whenever the node's snapshot changes; returns the function that stops it."""
        self._listeners.setdefault(node_id, set()).add(listener)

        def cancel() -> None:
            listeners = self._listeners.get(node_id)
            if listeners is not None:
                listeners.discard(listener)
                if not listeners:
                    del self._listeners[node_id]

        return cancel
