"""LDS resources: HTTP listeners (REST and gRPC on one port) and the HTTP connection manager each one runs."""

from __future__ import annotations

from collections.abc import Callable

from envoy.config.core.v3 import protocol_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

from xds_control.resources import request_limits
from xds_control.resources.core import ads_source, seconds, socket_address
from xds_control.resources.headerless_grpc import model_routing_filters
from xds_control.resources.local_replies import local_reply_config
from xds_control.resources.type_urls import pack

#: HTTP/2's largest flow-control window (2^31 - 1).
_MAX_HTTP2_WINDOW = 2**31 - 1


def _http_connection_manager(
    stat_prefix: str,
    *,
    rds_name: str | None = None,
    route_config: route_pb2.RouteConfiguration | None = None,
    policy_filters: bool = False,
    model_routing: bool = False,
    buffer_limit_bytes: int = request_limits.DEFAULT_MAX_REQUEST_BYTES,
    configure: Callable[[hcm_pb2.HttpConnectionManager], None] | None = None,
) -> hcm_pb2.HttpConnectionManager:
    # Extraction and route refresh come first: the rate limit and body size filters read the route's
    # per-filter configs, so they must see the route chosen by the model name.
    filters = model_routing_filters(buffer_limit_bytes) if model_routing else []
    filters.extend(request_limits.policy_filters() if policy_filters else [])
    filters.append(hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router())))
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        http_filters=filters,
        local_reply_config=local_reply_config(),
        # Infer calls can take long (cold models, big tensors); per-route timeouts bound them instead.
        stream_idle_timeout=seconds(300),
    )
    if model_routing:
        # A filter may hold at most one HTTP/2 stream window of a request (Envoy's default: 16 MiB), and the
        # field extraction holds a whole ModelInferRequest: the window must fit the largest request allowed.
        window = min(buffer_limit_bytes, _MAX_HTTP2_WINDOW)
        manager.http2_protocol_options.CopyFrom(
            protocol_pb2.Http2ProtocolOptions(
                initial_stream_window_size={"value": window}, initial_connection_window_size={"value": window}
            )
        )
    if rds_name is not None:
        manager.rds.CopyFrom(hcm_pb2.Rds(route_config_name=rds_name, config_source=ads_source()))
    elif route_config is not None:
        manager.route_config.CopyFrom(route_config)
    if configure is not None:
        configure(manager)
    return manager


def http_listener(
    name: str,
    host: str,
    port: int,
    *,
    rds_name: str | None = None,
    route_config: route_pb2.RouteConfiguration | None = None,
    policy_filters: bool = False,
    model_routing: bool = False,
    buffer_limit_bytes: int = request_limits.DEFAULT_MAX_REQUEST_BYTES,
    configure: Callable[[hcm_pb2.HttpConnectionManager], None] | None = None,
    exact_balance: bool = False,
) -> listener_pb2.Listener:
    """An HTTP listener (HTTP/1.1 and HTTP/2, so REST and gRPC on one port) with RDS or inline routes.

    ``policy_filters`` adds the rate limit and request size filters that routes may enable, ``model_routing``
    the filters that route gRPC calls by the model their request names (both for the ingress).
    ``buffer_limit_bytes`` is the most a filter may buffer of one request (413 beyond it): the field extraction
    holds a whole ModelInferRequest before the call is routed. ``configure`` may amend the HTTP connection
    manager last (xds_control.tracing_config adds tracing with it). ``exact_balance`` spreads accepted
    connections evenly over Envoy's workers, for listeners that take few long-lived connections (the mesh's own).
    """
    manager = _http_connection_manager(
        name,
        rds_name=rds_name,
        route_config=route_config,
        policy_filters=policy_filters,
        model_routing=model_routing,
        buffer_limit_bytes=buffer_limit_bytes,
        configure=configure,
    )
    # Envoy binds a connection to the worker that accepted it, and the kernel picks that worker at random. A
    # listener inside the mesh takes few long-lived HTTP/2 connections (a sidecar: one per ingress worker): left
    # to chance, half the time both land on one worker, which then carries all the load while the other idles, for
    # as long as the connections live. Exact balance hands each new connection to the least-loaded worker, at the
    # price of a lock per accept: not for the ingress, whose clients may open a connection per request.
    balance = (
        listener_pb2.Listener.ConnectionBalanceConfig(
            exact_balance=listener_pb2.Listener.ConnectionBalanceConfig.ExactBalance()
        )
        if exact_balance
        else None
    )
    return listener_pb2.Listener(
        name=name,
        address=socket_address(host, port),
        per_connection_buffer_limit_bytes={"value": buffer_limit_bytes},
        connection_balance_config=balance,
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager", typed_config=pack(manager)
                    )
                ]
            )
        ],
    )
