"""What the ingress refuses before calling a model version: too many requests (Envoy's local rate limit) and too
large a body (the buffer filter). The listener carries both filters, inert; a route or weighted cluster turns
them on with its own per-filter configs (RequestLimits)."""

from __future__ import annotations

from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.buffer.v3 import buffer_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.type.v3 import percent_pb2, token_bucket_pb2
from google.protobuf import any_pb2

from protos.topology.policies import RateLimitPolicy
from xds_control.resources.core import seconds
from xds_control.resources.type_urls import pack

RATE_LIMIT_FILTER = "envoy.filters.http.local_ratelimit"
BUFFER_FILTER = "envoy.filters.http.buffer"

#: Default largest request body at the ingress (and message size of runtimes the deployer starts): a 256 MiB
#: tensor plus its request's framing and JSON header. xds_control --max-request-mb changes it.
DEFAULT_MAX_REQUEST_BYTES = 288 * 2**20


def policy_filters() -> list[hcm_pb2.HttpFilter]:
    """Rate limit and body size filters, inert unless a route enables them with its per-filter config.

    The rate limiter comes first so that a request over the limit is refused before its body is buffered.
    """
    return [
        # Without a token bucket here, the filter limits only routes that carry a LocalRateLimit of their own.
        hcm_pb2.HttpFilter(
            name=RATE_LIMIT_FILTER, typed_config=pack(local_rate_limit_pb2.LocalRateLimit(stat_prefix="rate_limit"))
        ),
        hcm_pb2.HttpFilter(
            name=BUFFER_FILTER,
            # Disabled by default: buffering every request would cost latency and memory on routes without a limit.
            typed_config=pack(buffer_pb2.Buffer(max_request_bytes={"value": 1024 * 1024})),
            disabled=True,
        ),
    ]


@dataclass(frozen=True)
class RequestLimits:
    """What the ingress refuses before calling a model version: too many requests, too large a body."""

    stat_prefix: str
    rate_limit: RateLimitPolicy | None = None
    max_request_bytes: int | None = None

    def filter_configs(self) -> dict[str, any_pb2.Any]:
        """Per-filter configs for a route or weighted cluster (typed_per_filter_config)."""
        configs: dict[str, any_pb2.Any] = {}
        if self.rate_limit is not None:
            configs[RATE_LIMIT_FILTER] = pack(local_rate_limit(self.stat_prefix, self.rate_limit))
        if self.max_request_bytes is not None:
            configs[BUFFER_FILTER] = pack(
                buffer_pb2.BufferPerRoute(buffer=buffer_pb2.Buffer(max_request_bytes={"value": self.max_request_bytes}))
            )
        return configs


def local_rate_limit(stat_prefix: str, policy: RateLimitPolicy) -> local_rate_limit_pb2.LocalRateLimit:
    """A token bucket of ``burst`` tokens refilled with ``requests_per_second`` every second, enforced always."""
    always = base_pb2.RuntimeFractionalPercent(
        default_value=percent_pb2.FractionalPercent(numerator=100, denominator=percent_pb2.FractionalPercent.HUNDRED),
        runtime_key="hydro.rate_limit.enabled",
    )
    enforced = base_pb2.RuntimeFractionalPercent()
    enforced.CopyFrom(always)
    enforced.runtime_key = "hydro.rate_limit.enforced"
    return local_rate_limit_pb2.LocalRateLimit(
        stat_prefix=stat_prefix,
        token_bucket=token_bucket_pb2.TokenBucket(
            max_tokens=policy.bucket_size,
            tokens_per_fill={"value": policy.requests_per_second},
            fill_interval=seconds(1.0),
        ),
        filter_enabled=always,
        filter_enforced=enforced,
        # gRPC clients should back off (RESOURCE_EXHAUSTED), not fail over as they do on UNAVAILABLE.
        rate_limited_as_resource_exhausted=True,
    )
