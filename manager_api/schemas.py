"""Request and response bodies of the REST API (the stored records themselves are in protos.topology)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field

from protos.topology import Application, Deployment, Instance, ModelVersion, Policies, Stage

#: The etcd mod_revision a client read a record at; strict, so "12" or 12.5 are refused rather than coerced.
Revision = Annotated[
    int,
    Field(
        strict=True,
        ge=0,
        description="write only if the record is still at this revision (from a GET), else 409; "
        "0: only if it does not exist yet; omitted: write unconditionally",
        examples=[12],
    ),
]

#: ``?revision=N`` of a DELETE: delete only if the record is still at revision N (from a GET), else 409.
RevisionQuery = Annotated[
    int | None,
    Query(ge=0, description="delete only if the record is still at this revision (from a GET), else 409"),
]

_REVISION_DOC = "etcd mod_revision of this record: send it back as `revision` to update it only if unchanged"


class DeploymentSpec(BaseModel):
    """Body of ``PUT /api/v1/deployments/{model}/{version}``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"replicas": 2},
                {"replicas": 3, "revision": 12},
                {"replicas": 2, "policies": {"timeout_ms": 5000, "retries": {"attempts": 3}}, "revision": 14},
            ]
        },
    )
    replicas: int = Field(ge=0, le=64, description="how many runtime + sidecar pairs should run")
    policies: Policies | None = Field(
        None,
        description="traffic policies (docs/traffic_policies.md); omitted: keep the current ones (defaults if new)",
    )
    revision: Revision | None = None


class ApplicationSpec(BaseModel):
    """Body of ``PUT /api/v1/applications/{name}``: stages of weighted model versions."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"stages": [{"variants": [{"model": "iris", "version": 1, "weight": 100}]}]},
                {
                    "stages": [
                        {
                            "variants": [
                                {"model": "iris", "version": 1, "weight": 90},
                                {"model": "iris", "version": 2, "weight": 10},
                            ]
                        }
                    ],
                    "revision": 21,
                },
            ]
        },
    )
    stages: list[Stage] = Field(min_length=1)
    revision: Revision | None = None


class ModelVersionView(ModelVersion):
    """A registered model version and the revision it was stored at."""

    revision: int = Field(description=_REVISION_DOC, examples=[7])


class ModelView(BaseModel):
    """A model and all its registered versions."""

    name: str
    versions: list[ModelVersionView]


class DeploymentView(Deployment):
    """A deployment with the instances that are ready now."""

    revision: int = Field(description=_REVISION_DOC, examples=[12])
    ready_replicas: int
    instances: list[Instance]


class ApplicationView(Application):
    """An application and the revision it was stored at."""

    revision: int = Field(description=_REVISION_DOC, examples=[21])


class RevisionConflictBody(BaseModel):
    """The 409 answer to a write whose ``revision`` is not the record's current one; nothing was written."""

    error: str = Field(
        examples=["deployment iris/1 changed since revision 10 (now 12): read it again and retry"],
    )
    current_revision: int = Field(description="the record's revision now; 0 if it does not exist", examples=[12])


class ErrorBody(BaseModel):
    """Every other error: a message naming what is wrong."""

    error: str


#: OpenAPI ``responses`` of routes that take a ``revision``.
CONDITIONAL_WRITE_RESPONSES: dict[int | str, dict[str, object]] = {
    409: {"model": RevisionConflictBody, "description": "the record changed since `revision`; nothing was written"},
    422: {"model": ErrorBody, "description": "a field is invalid, e.g. a negative or non-integer `revision`"},
}


class Health(BaseModel):
    status: str
    etcd: str
