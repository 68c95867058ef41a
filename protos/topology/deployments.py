"""``deployments/{model}/{version}``: how many replicas of a model version run, and its traffic policies."""

from __future__ import annotations

from pydantic import Field

from protos.topology.policies import Policies
from protos.topology.records import Record, now_iso, trace_context_field


class Deployment(Record):
    """``deployments/{model}/{version}``: how many replicas of a model version should run, and its policies."""

    model: str
    version: int = Field(ge=1)
    replicas: int = Field(ge=0, le=64)
    # Records written before policies existed have none: they get the defaults.
    policies: Policies = Field(default_factory=Policies)
    created_at: str = Field(default_factory=now_iso)
    updated_at: str = Field(default_factory=now_iso)
    trace_context: str | None = trace_context_field()
