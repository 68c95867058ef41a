"""``replicas/`` and ``pipeline-replicas/`` (leased): every replica's status as the deployer running it sees it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from protos.topology.records import Record, now_iso

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
