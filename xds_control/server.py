"""State-of-the-world ADS: one gRPC stream per Envoy carrying CDS, EDS, LDS and RDS.

The rules this module enforces (DESIGN.md, "Control plane rules"):
- one response per request; a type is answered only after Envoy asked for it;
- ACK or NACK is read from ``error_detail``; a NACKed version is never sent again;
- requests carrying a nonce other than the last one sent for their type are stale and ignored;
- make-before-break: listeners and routes go out only once every cluster they name is acknowledged and its
  endpoints answered; a cluster that routes in use still name stays in CDS until the proxy acknowledged routes
  without it; after a CDS change the next EDS request is always answered;
- requested names that do not exist are answered with empty resources instead of being left to time out.

``AdsServer`` also serves delta ADS on the same stream loop, hooks and snapshots (delta_server.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2

from xds_control.delta_server import DeltaAdsStream
from xds_control.resources import type_urls
from xds_control.snapshot import Snapshot, SnapshotCache, version_of
from xds_control.wire import encode_discovery_response

log = logging.getLogger(__name__)

ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"


class NodeRegistry(Protocol):
    """Told when proxies come and go, so that it can build and drop their snapshots."""

    def node_connected(self, node: base_pb2.Node) -> None: ...

    def node_disconnected(self, node_id: str) -> None: ...


class StreamMachine(Protocol):
    """One proxy's protocol state (state-of-the-world or delta), driven by ``AdsServer``'s stream loop."""

    node_id: str

    def handle_request(self, request: Any) -> list[bytes]: ...

    def push(self) -> list[bytes]: ...


class StreamCallbacks:
    """Hooks for metrics, status and logs; the protocol loop calls them and ignores what they return."""

    def on_ack(self, node_id: str, type_url: str, version: str) -> None:
        """A proxy accepted ``version`` of ``type_url``."""

    def on_nack(self, node_id: str, type_url: str, version: str, error: str) -> None:
        """A proxy rejected ``version`` of ``type_url`` with ``error``."""

    def on_response(self, node_id: str, type_url: str, version: str, size: int, resources: int) -> None:
        """A response of ``size`` bytes carrying ``resources`` resources (delta: added plus removed) went out."""

    def on_stream_closed(self, node_id: str) -> None:
        """The proxy's stream ended."""


@dataclass
class _TypeState:
    names: frozenset[str] = frozenset()
    pending: bool = False
    nonce: str = ""
    version: str = ""  # what the proxy has or was last sent
    sent: Mapping[str, bytes] = field(default_factory=dict)
    nacked_version: str | None = None
    acked: Mapping[str, bytes] = field(default_factory=dict)
    force: bool = False
    sent_route_clusters: frozenset[str] = frozenset()
    acked_route_clusters: frozenset[str] = frozenset()


_CHANGED = object()
_CLOSED = object()


class AdsStream:
    """The state of one proxy's stream. Owned by one task; nothing else touches it."""

    def __init__(self, node_id: str, cache: SnapshotCache, callbacks: StreamCallbacks) -> None:
        self.node_id = node_id
        self._cache = cache
        self._callbacks = callbacks
        self._types = {type_url: _TypeState() for type_url in type_urls.PUSH_ORDER}
        self._nonces = itertools.count(1)

    def handle_request(self, request: discovery_pb2.DiscoveryRequest) -> list[bytes]:
        """Apply one request from the proxy; return the responses to send, in push order."""
        log.debug(
            "%s -> %s version=%s nonce=%s names=%d error=%s",
            self.node_id,
            _short(request.type_url),
            request.version_info,
            request.response_nonce,
            len(request.resource_names),
            request.HasField("error_detail"),
        )
        state = self._types.get(request.type_url)
        if state is None:
            log.warning("%s asked for unsupported type %s", self.node_id, request.type_url)
            return []
        if request.response_nonce and request.response_nonce != state.nonce:
            return []  # stale: an answer to a response that has since been superseded
        if request.response_nonce:
            if request.HasField("error_detail"):
                state.nacked_version = state.version
                state.version = request.version_info
                error = request.error_detail.message
                log.warning(
                    "%s rejected %s version %s: %s",
                    self.node_id,
                    _short(request.type_url),
                    state.nacked_version,
                    error,
                )
                self._callbacks.on_nack(self.node_id, request.type_url, state.nacked_version or "", error)
            else:
                state.acked = state.sent
                state.acked_route_clusters = state.sent_route_clusters
                self._callbacks.on_ack(self.node_id, request.type_url, request.version_info)
        else:
            # First request of this type on this stream (or after a control-plane restart): the proxy may
            # already hold our version, in which case there is nothing to send.
            state.version = request.version_info
        state.names = frozenset(request.resource_names)
        state.pending = True
        return self.push()

    def push(self) -> list[bytes]:
        """Answer every pending request whose resources differ from what the proxy has, in push order."""
        snapshot = self._cache.get(self.node_id)
        if snapshot is None:
            return []
        out = []
        for type_url in type_urls.PUSH_ORDER:
            state = self._types[type_url]
            if not state.pending:
                continue
            if type_url in (type_urls.LISTENER, type_urls.ROUTE) and not self._clusters_ready(snapshot):
                continue
            items = self._items(type_url, snapshot)
            version = version_of(items)  # covers the names, so equal versions mean equal name sets
            if version == state.version and not state.nonce and not state.force:
                # The proxy told us on a new stream that it already holds this version (a control-plane
                # restart): nothing to send, and it counts as acknowledged. Not when a cluster changed on this
                # stream (force): its replacement warms until EDS answers, whatever endpoints the proxy holds.
                state.sent = state.acked = items
                if type_url in (type_urls.LISTENER, type_urls.ROUTE):
                    state.sent_route_clusters = state.acked_route_clusters = snapshot.routed[type_url]
                continue
            if (version == state.version and not state.force) or version == state.nacked_version:
                continue
            out.append(self._respond(type_url, state, items, version, snapshot))
        return out

    def _items(self, type_url: str, snapshot: Snapshot) -> dict[str, bytes]:
        state = self._types[type_url]
        current = snapshot.items(type_url)
        if type_url == type_urls.CLUSTER:
            items = dict(current)
            in_use: set[str] = set()
            for routes in (self._types[type_urls.LISTENER], self._types[type_urls.ROUTE]):
                in_use |= routes.acked_route_clusters | routes.sent_route_clusters
            for name in in_use - items.keys():
                if name in state.sent:
                    items[name] = state.sent[name]  # make-before-break: still routed to
            return items
        if type_url == type_urls.LISTENER:
            return dict(current)
        # EDS and RDS are asked for by name; unknown names get an empty resource rather than a time-out.
        items = {}
        clusters_kept = self._types[type_urls.CLUSTER].sent
        for name in state.names:
            if name in current:
                items[name] = current[name]
            elif type_url == type_urls.ENDPOINT and name in clusters_kept and name in state.sent:
                # make-before-break: its cluster stays (still routed to), so it keeps its endpoints until it goes.
                items[name] = state.sent[name]
            else:
                items[name] = _empty(type_url, name)
        return items

    def _clusters_ready(self, snapshot: Snapshot) -> bool:
        clusters = self._types[type_urls.CLUSTER].acked
        endpoints = self._types[type_urls.ENDPOINT].acked
        for name in snapshot.route_clusters:
            if name not in clusters:
                return False
            if name in snapshot.eds_clusters and name not in endpoints:
                return False
        return True

    def _respond(
        self, type_url: str, state: _TypeState, items: dict[str, bytes], version: str, snapshot: Snapshot
    ) -> bytes:
        nonce = str(next(self._nonces))
        if type_url == type_urls.CLUSTER:
            # A new or changed EDS cluster warms until EDS answers for it: forget the old answer and make sure
            # the next EDS request is answered even when endpoints did not change.
            eds = self._types[type_urls.ENDPOINT]
            changed = {name for name, data in items.items() if state.sent.get(name) != data}
            eds.acked = {k: v for k, v in eds.acked.items() if k not in changed}
            eds.force = True
        if type_url in (type_urls.LISTENER, type_urls.ROUTE):
            state.sent_route_clusters = snapshot.routed[type_url]
        state.pending = False
        state.force = False
        state.nonce = nonce
        state.version = version
        state.sent = items
        payload = encode_discovery_response(version, type_url, nonce, [items[name] for name in sorted(items)])
        log.debug(
            "%s <- %s version=%s nonce=%s resources=%d",
            self.node_id,
            _short(type_url),
            version,
            nonce,
            len(items),
        )
        self._callbacks.on_response(self.node_id, type_url, version, len(payload), len(items))
        return payload


def _empty(type_url: str, name: str) -> bytes:
    message: Any
    if type_url == type_urls.ENDPOINT:
        message = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    else:
        message = route_pb2.RouteConfiguration(name=name)
    return type_urls.pack(message).SerializeToString(deterministic=True)


def _as_is(payload: bytes) -> bytes:
    return payload


def _short(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]


class AdsServer:
    """Serves ADS to every proxy from a SnapshotCache; registers proxies with a NodeRegistry."""

    def __init__(self, cache: SnapshotCache, nodes: NodeRegistry, callbacks: StreamCallbacks | None = None) -> None:
        self._cache = cache
        self._nodes = nodes
        self._callbacks = callbacks or StreamCallbacks()

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        """The generic handler to add to a grpc.aio server: state-of-the-world and delta ADS.

        Responses are pre-encoded bytes. Which of the two a proxy speaks is its bootstrap's ``api_type``.
        """
        sotw = grpc.stream_stream_rpc_method_handler(
            self.stream,
            request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
            response_serializer=_as_is,
        )
        delta = grpc.stream_stream_rpc_method_handler(
            self.delta_stream,
            request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
            response_serializer=_as_is,
        )
        return grpc.method_handlers_generic_handler(
            "envoy.service.discovery.v3.AggregatedDiscoveryService",
            {"StreamAggregatedResources": sotw, "DeltaAggregatedResources": delta},
        )

    # grpc.aio streams responses only from async generator functions, hence the two thin wrappers.
    async def stream(
        self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """One proxy's state-of-the-world ADS stream: requests and snapshot changes in, responses out."""
        responses = self._serve(requests, context, lambda node: AdsStream(node, self._cache, self._callbacks))
        async with contextlib.aclosing(responses):  # the stream's cleanup runs when the call ends, not at GC
            async for payload in responses:
                yield payload

    async def delta_stream(
        self, requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """One proxy's delta ADS stream: requests and snapshot changes in, responses out."""
        responses = self._serve(requests, context, lambda node: DeltaAdsStream(node, self._cache, self._callbacks))
        async with contextlib.aclosing(responses):  # the stream's cleanup runs when the call ends, not at GC
            async for payload in responses:
                yield payload

    async def _serve(
        self,
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
        new_stream: Callable[[str], StreamMachine],
    ) -> AsyncGenerator[bytes, None]:
        inbox: asyncio.Queue[object] = asyncio.Queue()

        async def read() -> None:
            try:
                async for request in requests:
                    inbox.put_nowait(request)
            finally:
                inbox.put_nowait(_CLOSED)

        reader = asyncio.create_task(read())
        stream: StreamMachine | None = None
        stop_listening = None
        try:
            while True:
                item: Any = await inbox.get()
                if item is _CLOSED:
                    return
                if item is _CHANGED:
                    assert stream is not None
                    for payload in stream.push():
                        yield payload
                    continue
                if stream is None:
                    if not item.node.id:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first request must carry node.id")
                    stream = new_stream(item.node.id)
                    stop_listening = self._cache.listen(item.node.id, lambda: inbox.put_nowait(_CHANGED))
                    self._nodes.node_connected(item.node)
                    log.info("proxy %s connected (%s)", item.node.id, type(stream).__name__)
                for payload in stream.handle_request(item):
                    yield payload
        finally:
            reader.cancel()
            if stop_listening is not None:
                stop_listening()
            if stream is not None:
                log.info("proxy %s disconnected", stream.node_id)
                self._nodes.node_disconnected(stream.node_id)
                self._callbacks.on_stream_closed(stream.node_id)
