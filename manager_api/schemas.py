"""Request and response bodies of the REST API (the stored records themselves are in protos.topology)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from protos.topology import Deployment, Instance, ModelVersion, Policies, Stage


class DeploymentSpec(BaseModel):
    """Body of ``PUT /api/v1/deployments/{model}/{version}``."""

    model_config = ConfigDict(extra="forbid")
    replicas: int = Field(ge=0, le=64, description="how many runtime + sidecar pairs should run")
    policies: Policies | None = Field(
        None,
        description="traffic policies (docs/traffic_policies.md); omitted: keep the current ones (defaults if new)",
    )


class ApplicationSpec(BaseModel):
    """Body of ``PUT /api/v1/applications/{name}``: stages of weighted model versions."""

    model_config = ConfigDict(extra="forbid")
    stages: list[Stage] = Field(min_length=1)


class ModelView(BaseModel):
    """A model and all its registered versions."""

    name: str
    versions: list[ModelVersion]


class DeploymentView(Deployment):
    """A deployment with the instances that are ready now."""

    ready_replicas: int
    instances: list[Instance]


class Health(BaseModel):
    status: str
    etcd: str
