"""The desired-state schema stored in etcd, shared by manager_api (writer) and xds_control (reader).

Every value is JSON with a ``schema_version`` so that etcdctl users can read it and future versions can
migrate it. Keys live under a configurable prefix (default ``/hydro/``):

- ``models/{model}/{version}``          ModelVersion   (immutable once written)
- ``deployments/{model}/{version}``     Deployment
- ``applications/{app}``                Application
- ``instances/{model}/{version}/{id}``  Instance       (leased; written only once the instance is ready)
- ``proxies/{node_id}``                 ProxyStatus    (leased; written by xds_control)
- ``nodes/{name}``                      Node           (leased; written by the deployer running on that node)
- ``replicas/{model}/{version}/{id}``   ReplicaStatus  (leased with its node; every replica, whatever its state)
- ``pipelines/{app}/{id}``              PipelineInstance (leased; a ready pipeline runtime of a multi-stage app)
- ``pipeline-replicas/{app}/{id}``      PipelineReplicaStatus (leased with its node; every pipeline replica)
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 1
DEFAULT_PREFIX = "/hydro/"

NAME_PATTERN = r"^[a-z0-9]([a-z0-9_.-]{0,61}[a-z0-9])?$"
_NAME_RE = re.compile(NAME_PATTERN)

Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]
DATATYPES: tuple[str, ...] = Datatype.__args__  # type: ignore[attr-defined]

ResourceName = Annotated[
    str,
    Field(
        pattern=NAME_PATTERN,
        description="lower-case letters, digits, '-', '_' and '.', 1 to 63 characters",
        examples=["iris"],
    ),
]


def now_iso() -> str:
    """The current time as an ISO-8601 UTC timestamp, as stored in records."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def is_valid_name(name: str) -> bool:
    """Whether ``name`` can be used as a model, application or instance name (it becomes a key segment)."""
    # fullmatch, not match: the pattern's `$` also matches before a final newline, so "iris\n" would pass.
    return bool(_NAME_RE.fullmatch(name))


class Record(BaseModel):
    """Base of every stored value: strict about unknown fields so typos in manifests are caught."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: int = SCHEMA_VERSION


#: Longest ``trace_context`` kept (a W3C traceparent is 55 characters; room for a future version of it).
TRACE_CONTEXT_MAX_CHARS = 256


def _trace_context_field() -> Any:
    # Left out of the JSON when unset: a write made with tracing off stores exactly what it stored before the
    # field existed, so readers older than it (extra="forbid") keep reading such records.
    return Field(
        default=None,
        max_length=TRACE_CONTEXT_MAX_CHARS,
        exclude_if=lambda value: value is None,
        description="W3C traceparent of the manager write that stored this record (unset: that write was not "
        "traced); xds_control links its push to it (docs/tracing.md)",
    )


class TensorSpec(BaseModel):
    """One input or output of a model signature. ``-1`` in the shape is a wildcard dimension."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, max_length=256)
    datatype: Datatype
    shape: list[int]

    @field_validator("shape", mode="before")
    @classmethod
    def _no_booleans(cls, shape: object) -> object:
        # Pydantic's int takes true as 1: a serving.yaml shape of [true, 4] would quietly be [1, 4].
        if isinstance(shape, list | tuple) and any(isinstance(dim, bool) for dim in shape):
            raise ValueError("dimensions are integers (a size, or -1 for any size), not true/false")
        return shape

    @field_validator("shape")
    @classmethod
    def _dims(cls, shape: list[int]) -> list[int]:
        for dim in shape:
            if dim < -1 or dim == 0:
                raise ValueError(f"dimension {dim} is not allowed: use a positive size or -1 for any size")
        return shape


class Signature(BaseModel):
    """Inputs and outputs of a model; requests are validated against it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)

    @field_validator("inputs", "outputs")
    @classmethod
    def _unique(cls, specs: list[TensorSpec]) -> list[TensorSpec]:
        names = [s.name for s in specs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"tensor names must be unique, repeated: {', '.join(dupes)}")
        return specs


class Artifact(BaseModel):
    """Where a model version's files are: a content-addressed archive of the model folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    digest: str = Field(pattern=r"^sha256:[0-9a-f]{64}$", description="sha256 of the archive as uploaded")
    uri: str
    size: int = Field(ge=0)
    # Records registered before runtimes verified their folders have neither: they deploy unverified.
    folder_digest: str | None = Field(
        default=None,
        pattern=r"^sha256:[0-9a-f]{64}$",
        description="sha256 of the unpacked model folder's manifest (runtimes/model_digest.py); runtimes check it",
    )
    files: dict[str, str] | None = Field(
        default=None,
        description="the folder's manifest: relative path -> sha256 hex; lets a runtime name the file that differs",
    )


class ModelVersion(Record):
    """``models/{name}/{version}``: an immutable, registered model version."""

    name: str
    version: int = Field(ge=1)
    runtime: str
    artifact: Artifact
    signature: Signature
    labels: dict[str, str] = Field(default_factory=dict)
    created_at: str = Field(default_factory=now_iso)


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


class Deployment(Record):
    """``deployments/{model}/{version}``: how many replicas of a model version should run, and its policies."""

    model: str
    version: int = Field(ge=1)
    replicas: int = Field(ge=0, le=64)
    # Records written before policies existed have none: they get the defaults.
    policies: Policies = Field(default_factory=Policies)
    created_at: str = Field(default_factory=now_iso)
    updated_at: str = Field(default_factory=now_iso)
    trace_context: str | None = _trace_context_field()


class Variant(BaseModel):
    """One model version that serves a share of a stage's traffic."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str
    version: int = Field(ge=1)
    weight: int = Field(ge=0, le=100)


class ShadowVariant(BaseModel):
    """A model version that gets a copy of a stage's input; its answer is only compared, never returned."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str
    version: int = Field(ge=1)


class Stage(BaseModel):
    """One step of an application; its variants' weights sum to 100. Shadows see its traffic, answer nobody."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    variants: list[Variant] = Field(min_length=1)
    # Records written before shadows existed have none.
    shadows: list[ShadowVariant] = Field(default_factory=list)


#: Most pipeline runtime replicas an application may ask for.
MAX_PIPELINE_REPLICAS = 16


class Application(Record):
    """``applications/{name}``: an addressable endpoint made of stages of weighted model versions."""

    name: str
    stages: list[Stage] = Field(min_length=1)
    #: Pipeline runtimes that serve it when it needs one (``needs_pipeline``); ignored otherwise.
    pipeline_replicas: int = Field(default=1, ge=1, le=MAX_PIPELINE_REPLICAS)
    created_at: str = Field(default_factory=now_iso)
    updated_at: str = Field(default_factory=now_iso)
    trace_context: str | None = _trace_context_field()

    @property
    def needs_pipeline(self) -> bool:
        """Whether a pipeline runtime serves it: several stages, or any shadow. Otherwise the ingress routes
        straight to the one stage's variants."""
        return len(self.stages) > 1 or any(stage.shadows for stage in self.stages)


class Instance(Record):
    """``instances/{model}/{version}/{id}`` (leased): a ready runtime reachable through its sidecar."""

    model: str
    version: int
    id: str
    node: str
    address: str
    port: int
    state: Literal["ready", "draining"] = "ready"


#: Longest ``ReplicaStatus.last_error`` (characters): the exit status and the tail of the runtime's log.
LAST_ERROR_MAX_CHARS = 2048

ReplicaState = Literal["starting", "ready", "crash-looping", "draining"]


class ReplicaStatus(Record):
    """``replicas/{model}/{version}/{id}`` (leased with its node's instances): one replica as its deployer sees it.

    Unlike ``instances/`` (ready endpoints only, what EDS serves), every replica has one from its first start until
    it is stopped, so a crash loop is visible. A node that dies takes its statuses with it when its lease expires.
    """

    model: str
    version: int = Field(ge=1)
    id: str
    node: str
    state: ReplicaState
    #: Where its sidecar listens (port 0 before the first start).
    address: str
    port: int = Field(default=0, ge=0, le=65535)
    restarts: int = Field(default=0, ge=0)
    #: When the replica entered ``state`` (ISO-8601 UTC).
    since: str = Field(default_factory=now_iso)
    #: Why it last crashed: exit code or signal and the last lines of its log; kept across restarts.
    last_error: str | None = Field(default=None, max_length=LAST_ERROR_MAX_CHARS)
    #: While crash-looping: when the deployer starts it again (ISO-8601 UTC).
    next_restart_at: str | None = None


class PipelineInstance(Record):
    """``pipelines/{app}/{id}`` (leased): a ready pipeline runtime of an application, reachable through its sidecar.

    ``spec_digest`` names the stages, variants and shadows it was started with (weights excluded: Envoy owns them).
    """

    app: str
    id: str
    node: str
    address: str
    port: int
    spec_digest: str
    state: Literal["ready", "draining"] = "ready"


class PipelineReplicaStatus(Record):
    """``pipeline-replicas/{app}/{id}`` (leased with its node): one pipeline replica as its deployer sees it; the
    fields mean what they mean in ReplicaStatus."""

    app: str
    id: str
    node: str
    state: ReplicaState
    address: str
    port: int = Field(default=0, ge=0, le=65535)
    spec_digest: str
    restarts: int = Field(default=0, ge=0)
    since: str = Field(default_factory=now_iso)
    last_error: str | None = Field(default=None, max_length=LAST_ERROR_MAX_CHARS)
    next_restart_at: str | None = None


class ProxyStatus(Record):
    """``proxies/{node_id}`` (leased): what a connected Envoy has acknowledged, and its last rejection."""

    node_id: str
    role: str
    acked: dict[str, str] = Field(default_factory=dict)
    last_nack: str | None = None
    last_nack_at: str | None = None
    connected_at: str = Field(default_factory=now_iso)


class Node(Record):
    """``nodes/{name}`` (leased): a live deployer (``hydro up``'s local one or a ``hydro agent``) that runs replicas.

    It shares its lease with the node's instances: when the node dies, it and its endpoints leave etcd together.
    """

    name: str = Field(pattern=NAME_PATTERN)
    #: The address other hosts reach this node's sidecars at (registered in its instances).
    advertise_address: str
    started_at: str = Field(default_factory=now_iso)


class Keys:
    """Builds and parses etcd keys under one prefix. The only place that knows the key layout."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        if not prefix.endswith("/"):
            prefix += "/"
        self.prefix = prefix

    def model_versions(self, model: str | None = None) -> str:
        return f"{self.prefix}models/" + (f"{model}/" if model else "")

    def model_version(self, model: str, version: int) -> str:
        return f"{self.prefix}models/{model}/{version}"

    def version_counter(self, model: str) -> str:
        """The last version number handed out for ``model`` (plain integer), so deleted numbers are not reused."""
        return f"{self.prefix}version-counters/{model}"

    def deployments(self) -> str:
        return f"{self.prefix}deployments/"

    def deployment(self, model: str, version: int) -> str:
        return f"{self.prefix}deployments/{model}/{version}"

    def applications(self) -> str:
        return f"{self.prefix}applications/"

    def application(self, name: str) -> str:
        return f"{self.prefix}applications/{name}"

    def instances(self, model: str | None = None, version: int | None = None) -> str:
        key = f"{self.prefix}instances/"
        if model is not None:
            key += f"{model}/"
            if version is not None:
                key += f"{version}/"
        return key

    def instance(self, model: str, version: int, instance_id: str) -> str:
        return f"{self.prefix}instances/{model}/{version}/{instance_id}"

    def proxies(self) -> str:
        return f"{self.prefix}proxies/"

    def proxy(self, node_id: str) -> str:
        return f"{self.prefix}proxies/{node_id}"

    def nodes(self) -> str:
        return f"{self.prefix}nodes/"

    def node(self, name: str) -> str:
        return f"{self.prefix}nodes/{name}"

    def replica_statuses(self, model: str | None = None, version: int | None = None) -> str:
        key = f"{self.prefix}replicas/"
        if model is not None:
            key += f"{model}/"
            if version is not None:
                key += f"{version}/"
        return key

    def replica_status(self, model: str, version: int, replica_id: str) -> str:
        return f"{self.prefix}replicas/{model}/{version}/{replica_id}"

    def pipelines(self, app: str | None = None) -> str:
        return f"{self.prefix}pipelines/" + (f"{app}/" if app is not None else "")

    def pipeline(self, app: str, instance_id: str) -> str:
        return f"{self.prefix}pipelines/{app}/{instance_id}"

    def pipeline_statuses(self, app: str | None = None) -> str:
        return f"{self.prefix}pipeline-replicas/" + (f"{app}/" if app is not None else "")

    def pipeline_status(self, app: str, replica_id: str) -> str:
        return f"{self.prefix}pipeline-replicas/{app}/{replica_id}"

    def kind_of(self, key: str) -> str | None:
        """The first path segment after the prefix (``models``, ``instances``...), or None if foreign."""
        if not key.startswith(self.prefix):
            return None
        return key[len(self.prefix) :].split("/", 1)[0]
