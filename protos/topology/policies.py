"""The traffic policies of a deployment, enforced by the ingress Envoy (and batching, by the runtime)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: Conditions Envoy can retry on (``retry_on``): HTTP ones and gRPC status ones, in one list as Envoy takes them.
RetryCondition = Literal[
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "refused-stream",
    "retriable-4xx",
    "envoy-ratelimited",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
]

#: Retry what certainly never reached a model, or was refused or cut off by a proxy in front of it (the mesh's
#: own churn: a replica stopping, a sidecar restarting), plus gRPC CANCELLED/UNAVAILABLE as Istio does. Model
#: errors (HTTP 500, gRPC INTERNAL) are not retried by default: a model that raises usually raises again.
DEFAULT_RETRY_ON: tuple[RetryCondition, ...] = (
    "connect-failure",
    "refused-stream",
    "reset",
    "gateway-error",
    "unavailable",
    "cancelled",
)

_MAX_MS = 24 * 3600 * 1000


class _Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetryPolicy(_Policy):
    """How the ingress retries a failed call to a model version (Envoy route retry policy + cluster budget)."""

    attempts: int = Field(default=2, ge=0, le=10, description="retries after the first try; 0 disables retries")
    per_try_timeout_ms: int | None = Field(
        default=None, ge=1, le=_MAX_MS, description="deadline of each try; unset: each try may use the whole timeout"
    )
    retry_on: list[RetryCondition] = Field(
        default_factory=lambda: list(DEFAULT_RETRY_ON),
        min_length=1,
        description="Envoy retry conditions, HTTP and gRPC alike (x-envoy-retry-on and x-envoy-retry-grpc-on)",
    )
    budget_percent: float = Field(
        default=20.0,
        ge=0,
        le=100,
        description="retries in flight as a percentage of requests in flight (Envoy retry budget; at least 3)",
    )

    @field_validator("retry_on", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        # Envoy users write "5xx,reset"; accept that as well as a list.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("retry_on")
    @classmethod
    def _dedupe(cls, value: list[RetryCondition]) -> list[RetryCondition]:
        return list(dict.fromkeys(value))


class CircuitBreakerPolicy(_Policy):
    """Caps on what the ingress sends to all replicas of a model version at once (Envoy's defaults: 1024)."""

    max_requests: int = Field(default=1024, ge=1, le=1_000_000, description="requests in flight")
    max_pending_requests: int = Field(default=1024, ge=1, le=1_000_000, description="requests waiting for a connection")
    max_connections: int = Field(default=1024, ge=1, le=1_000_000, description="connections to the replicas")


class OutlierDetectionPolicy(_Policy):
    """Passive health: a replica that fails calls in a row is ejected from load balancing for a while."""

    consecutive_5xx: int = Field(default=5, ge=1, le=1000, description="failures in a row (HTTP 5xx, gRPC errors)")
    interval_ms: int = Field(default=10_000, ge=10, le=_MAX_MS, description="how often ejections are re-evaluated")
    base_ejection_ms: int = Field(
        default=30_000, ge=10, le=_MAX_MS, description="first ejection time (grows each time)"
    )
    max_ejection_percent: int = Field(
        default=10, ge=0, le=100, description="most replicas ejected at once (at least one is always ejectable)"
    )


class HealthCheckPolicy(_Policy):
    """Active gRPC health checks (grpc.health.v1) of each replica by the ingress, like a readiness probe."""

    interval_ms: int = Field(default=10_000, ge=10, le=_MAX_MS)
    timeout_ms: int = Field(default=1_000, ge=10, le=_MAX_MS)
    unhealthy_threshold: int = Field(default=3, ge=1, le=100, description="failed checks before a replica is unhealthy")
    healthy_threshold: int = Field(default=1, ge=1, le=100, description="passed checks before it is healthy again")


class RateLimitPolicy(_Policy):
    """A token bucket per route on each ingress: ``requests_per_second`` refilled every second, ``burst`` deep."""

    requests_per_second: int = Field(ge=1, le=1_000_000)
    burst: int | None = Field(default=None, ge=1, le=1_000_000, description="bucket size; unset: requests_per_second")

    @property
    def bucket_size(self) -> int:
        """The number of requests that may arrive at once."""
        return self.burst if self.burst is not None else self.requests_per_second


class BatchingPolicy(_Policy):
    """Adaptive batching in the runtime: concurrent requests are predicted together (see docs/runtimes.md)."""

    max_batch_size: int = Field(ge=2, le=4096, description="most rows in one predict call")
    max_delay_ms: float = Field(
        default=2.0, ge=0, le=1_000, description="longest a request waits for others to join its batch"
    )


class Policies(_Policy):
    """Traffic policies of one model version, enforced by the ingress Envoy (see docs/traffic_policies.md)."""

    timeout_ms: int = Field(default=60_000, ge=1, le=_MAX_MS, description="deadline of a whole call, retries included")
    retries: RetryPolicy = Field(default_factory=RetryPolicy)
    circuit_breaker: CircuitBreakerPolicy = Field(default_factory=CircuitBreakerPolicy)
    outlier_detection: OutlierDetectionPolicy | None = Field(default=None, description="unset: no passive ejection")
    health_check: HealthCheckPolicy | None = Field(default=None, description="unset: no active health checks")
    rate_limit: RateLimitPolicy | None = Field(default=None, description="unset: no rate limit")
    max_request_bytes: int | None = Field(
        default=None,
        ge=1,
        le=4 * 1024**3 - 1,
        description="largest request body accepted; unset: no limit at the ingress",
    )
    batching: BatchingPolicy | None = Field(
        default=None, description="adaptive batching in the runtime (not the ingress); unset: off"
    )

    @model_validator(mode="after")
    def _per_try_within_timeout(self) -> Policies:
        per_try = self.retries.per_try_timeout_ms
        if per_try is not None and per_try > self.timeout_ms:
            raise ValueError(f"retries.per_try_timeout_ms ({per_try}) must not exceed timeout_ms ({self.timeout_ms})")
        return self
