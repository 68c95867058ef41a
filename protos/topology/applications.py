"""``applications/{app}``: an endpoint made of stages of weighted model versions and their shadows."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from protos.topology.records import Record, now_iso, trace_context_field


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
    trace_context: str | None = trace_context_field()

    @property
    def needs_pipeline(self) -> bool:
        """Whether a pipeline runtime serves it: several stages, or any shadow. Otherwise the ingress routes
        straight to the one stage's variants."""
        return len(self.stages) > 1 or any(stage.shadows for stage in self.stages)
