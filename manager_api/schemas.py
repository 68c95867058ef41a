"""Request and response bodies of the REST API (the stored records themselves are in protos.topology)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field, field_validator

from protos.topology.applications import MAX_PIPELINE_REPLICAS, Application, Stage
from protos.topology.deployments import Deployment
from protos.topology.models import ModelVersion
from protos.topology.policies import Policies
from protos.topology.replicas import LAST_ERROR_MAX_CHARS, ReplicaState

#: etcd's largest revision (a signed 64-bit integer): a larger number cannot even be sent to etcd.
MAX_REVISION = 2**63 - 1

#: The etcd mod_revision a client read a record at; strict, so "12" or 12.5 are refused rather than coerced.
Revision = Annotated[
    int,
    Field(
        strict=True,
        ge=0,
        le=MAX_REVISION,
        description="write only if the record is still at this revision (from a GET), else 409; "
        "0: only if it does not exist yet; omitted: write unconditionally",
        examples=[12],
    ),
]

#: ``?revision=N`` of a DELETE: delete only if the record is still at revision N (from a GET), else 409.
RevisionQuery = Annotated[
    int | None,
    Query(
        ge=0, le=MAX_REVISION, description="delete only if the record is still at this revision (from a GET), else 409"
    ),
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
    # strict: `true` or "2" is a mistake to show (422), not a count to guess.
    replicas: int = Field(strict=True, ge=0, le=64, description="how many runtime + sidecar pairs should run")
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
    pipeline_replicas: int = Field(
        default=1,
        strict=True,
        ge=1,
        le=MAX_PIPELINE_REPLICAS,
        description="pipeline runtimes serving it when it has several stages or a shadow; ignored otherwise",
    )
    revision: Revision | None = None

    @field_validator("stages", mode="before")
    @classmethod
    def _integers_are_json_integers(cls, stages: Any) -> Any:
        """Refuse `"2"`, `2.0` or `true` as a version or weight (Stage, a stored record, coerces them: strict
        there would be strict for etcd's values too)."""
        if not isinstance(stages, list):
            return stages  # the list's own validation names the problem
        for index, stage in enumerate(stages):
            if not isinstance(stage, dict):
                continue
            for kind, fields in (("variants", ("version", "weight")), ("shadows", ("version",))):
                members = stage.get(kind)
                for position, member in enumerate(members if isinstance(members, list) else []):
                    for name in fields:
                        value = member.get(name) if isinstance(member, dict) else None
                        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                            raise ValueError(f"stages[{index}].{kind}[{position}].{name} must be a JSON integer")
        return stages


class ModelVersionView(ModelVersion):
    """A registered model version and the revision it was stored at."""

    revision: int = Field(description=_REVISION_DOC, examples=[7])


class ModelView(BaseModel):
    """A model and all its registered versions."""

    name: str
    versions: list[ModelVersionView]


class InstanceView(BaseModel):
    """One replica as the deployer running it reports it: of a deployment (``replicas/`` in etcd) or of an
    application's pipeline runtime (``pipeline-replicas/``)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "local-3f9c2a1b",
                    "node": "local",
                    "state": "ready",
                    "address": "127.0.0.1",
                    "port": 41234,
                    "restarts": 0,
                    "since": "2026-11-25T18:40:02.120+00:00",
                    "last_error": None,
                    "next_restart_at": None,
                },
                {
                    "id": "h1-0d4e5f6a",
                    "node": "h1",
                    "state": "crash-looping",
                    "address": "10.77.0.11",
                    "port": 40111,
                    "restarts": 3,
                    "since": "2026-11-25T18:41:10.500+00:00",
                    "last_error": "runtime-h1-0d4e5f6a exited with code 1\n--- runtime-h1-0d4e5f6a log ---\n"
                    "... CRITICAL runtimes: cannot load model 'iris' version 2 from ...: No module named 'sklearn'",
                    "next_restart_at": "2026-11-25T18:41:14.500+00:00",
                },
            ]
        }
    )
    id: str
    node: str = Field(description="the node (`hydro up`'s is local, or a `hydro agent --node`) that runs it")
    state: ReplicaState = Field(
        description="starting: processes launched, not ready yet; ready: registered, receiving traffic; "
        "crash-looping: a process exited or never got ready, waiting until next_restart_at to start again; "
        "draining: deregistered, stopping (scale down or delete)"
    )
    address: str = Field(description="where its sidecar listens (other hosts call it there)")
    port: int = Field(description="its sidecar's port; 0 before the first start")
    restarts: int = Field(description="starts after a crash so far")
    since: str = Field(description="when it entered this state (ISO-8601 UTC)")
    last_error: str | None = Field(
        default=None,
        description=f"the last crash: exit code or signal and the tail of the log, at most {LAST_ERROR_MAX_CHARS} "
        "characters; kept across restarts",
    )
    next_restart_at: str | None = Field(
        default=None, description="while crash-looping: when it starts again (ISO-8601 UTC)"
    )


class DeploymentView(Deployment):
    """A deployment with the state of each of its replicas."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "schema_version": 1,
                    "model": "iris",
                    "version": 1,
                    "replicas": 2,
                    "policies": {"timeout_ms": 60000},
                    "created_at": "2026-11-25T18:39:58.002+00:00",
                    "updated_at": "2026-11-25T18:39:58.002+00:00",
                    "revision": 12,
                    "ready_replicas": 1,
                    "instances": [
                        {
                            "id": "local-3f9c2a1b",
                            "node": "local",
                            "state": "ready",
                            "address": "127.0.0.1",
                            "port": 41234,
                            "restarts": 0,
                            "since": "2026-11-25T18:40:02.120+00:00",
                            "last_error": None,
                            "next_restart_at": None,
                        },
                        {
                            "id": "local-9a8b7c6d",
                            "node": "local",
                            "state": "starting",
                            "address": "127.0.0.1",
                            "port": 41240,
                            "restarts": 0,
                            "since": "2026-11-25T18:40:03.510+00:00",
                            "last_error": None,
                            "next_restart_at": None,
                        },
                    ],
                }
            ]
        }
    )

    revision: int = Field(description=_REVISION_DOC, examples=[12])
    ready_replicas: int = Field(description="replicas registered as ready endpoints (what the mesh routes to)")
    instances: list[InstanceView] = Field(
        description="every replica that a live node runs, whatever its state; a node that dies takes its "
        "replicas' entries with it when its lease expires"
    )


class VariantStatus(BaseModel):
    """One variant or shadow of a stage, and how many of its replicas can take traffic now."""

    stage: int = Field(description="the stage, counted from 1", examples=[1])
    model: str = Field(examples=["iris"])
    version: int = Field(examples=[2])
    weight: int | None = Field(description="its share of the stage's traffic; null for a shadow", examples=[10])
    ready_replicas: int = Field(examples=[2])


class ApplicationStatus(BaseModel):
    """Whether the application can answer: every stage has a weighted variant with a ready replica, and its
    pipeline runtime (when it needs one: several stages or a shadow) a ready replica."""

    ready: bool
    #: Why not, when not: the first stage that has no ready replica where its traffic goes, else the pipeline.
    reason: str | None = Field(default=None, examples=["stage 1: no ready replica of iris:2 (weight 100)"])
    variants: list[VariantStatus]
    pipeline_ready_replicas: int | None = Field(
        default=None, description="ready pipeline runtimes; null when the ingress calls the one stage directly"
    )
    pipeline_replicas: list[InstanceView] | None = Field(
        default=None,
        description="every replica of its pipeline runtime as its deployer reports it (a crash loop shows its last "
        "error here); null when the ingress calls the one stage directly",
    )


class ApplicationView(Application):
    """An application, the revision it was stored at, and whether its model versions can serve it now."""

    revision: int = Field(description=_REVISION_DOC, examples=[21])
    status: ApplicationStatus


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


class ServerPath(BaseModel):
    """Body of ``POST /api/v1/models/{model}/versions/from-path``: a model folder on the manager's machine."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"path": "/srv/models/iris"}]})
    path: str = Field(
        min_length=1, max_length=4096, description="absolute, or relative to the manager's working directory"
    )
