"""``/api/v1/applications``: named endpoints that split traffic across model versions by weight."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import APIRouter, Response

from manager_api.dependencies import ApplicationName, Store
from manager_api.errors import ApiProblem, not_found
from manager_api.schemas import (
    CONDITIONAL_WRITE_RESPONSES,
    ApplicationSpec,
    ApplicationStatus,
    ApplicationView,
    InstanceView,
    RevisionQuery,
    VariantStatus,
)
from manager_api.store.errors import VersionNotRegistered
from manager_api.store.records import Stored
from manager_api.store.topology_store import TopologyStore
from protos.contracts import ContractError, check_application, version_key
from protos.topology.applications import Application, ShadowVariant, Variant
from protos.topology.models import Signature
from protos.topology.replicas import PipelineReplicaStatus

router = APIRouter(prefix="/applications", tags=["applications"])

#: Most stages of one application: each is a hop through the pipeline's sidecar and a share of its deadline.
MAX_STAGES = 16
#: Fields of a PipelineReplicaStatus that its application's view already says (or that only the deployer needs).
_NOT_IN_VIEW = {"schema_version", "app", "spec_digest"}


async def _check(store: TopologyStore, name: str, spec: ApplicationSpec) -> Application:
    """The application record, once its weights, references and contract between stages are right."""
    if len(spec.stages) > MAX_STAGES:
        raise ApiProblem(400, f"stages: {len(spec.stages)} given, at most {MAX_STAGES} stages are supported")
    signatures: dict[str, Signature] = {}
    for index, stage in enumerate(spec.stages):
        where = f"stages[{index}]"
        total = sum(v.weight for v in stage.variants)
        if total != 100:
            weights = " + ".join(str(v.weight) for v in stage.variants)
            raise ApiProblem(400, f"{where}: variant weights must sum to 100, got {weights} = {total}")
        seen: set[tuple[str, int]] = set()
        for variant in stage.variants:
            key = (variant.model, variant.version)
            if key in seen:
                raise ApiProblem(400, f"{where}: model version {variant.model}:{variant.version} is listed twice")
            seen.add(key)
        for shadow in stage.shadows:
            key = (shadow.model, shadow.version)
            if key in seen:
                # A shadow compared with itself (or listed twice) says nothing and doubles the load.
                raise ApiProblem(
                    400, f"{where}: model version {shadow.model}:{shadow.version} is listed twice (variant or shadow)"
                )
            seen.add(key)
        members: list[Variant | ShadowVariant] = [*stage.variants, *stage.shadows]
        for member in members:
            registered = await store.get_model_version(member.model, member.version)
            if registered is None:
                raise ApiProblem(400, f"{where}: model version {member.model}:{member.version} is not registered")
            signatures[version_key(member.model, member.version)] = registered.signature
    application = Application(name=name, stages=spec.stages, pipeline_replicas=spec.pipeline_replicas)
    try:
        check_application(application, signatures)
    except ContractError as exc:
        raise ApiProblem(400, f"contract between model versions: {exc}") from exc
    return application


@dataclass
class Serving:
    """What runs now: ready endpoints per model version and per application's pipeline, and the pipeline
    replicas' statuses per application (three reads for any number of applications)."""

    ready: dict[tuple[str, int] | str, int] = field(default_factory=dict)
    pipeline_replicas: dict[str, list[PipelineReplicaStatus]] = field(default_factory=dict)


async def _serving(store: TopologyStore) -> Serving:
    serving = Serving()
    ready = serving.ready
    for instance in await store.list_instances():
        if instance.state == "ready":
            key = (instance.model, instance.version)
            ready[key] = ready.get(key, 0) + 1
    for pipeline in await store.list_pipelines():
        if pipeline.state == "ready":
            ready[pipeline.app] = ready.get(pipeline.app, 0) + 1
    for status in await store.list_pipeline_statuses():
        serving.pipeline_replicas.setdefault(status.app, []).append(status)
    return serving


def _view(stored: Stored[Application], serving: Serving) -> ApplicationView:
    return ApplicationView(
        **stored.record.model_dump(), revision=stored.revision, status=_status(stored.record, serving)
    )


def _status(application: Application, serving: Serving) -> ApplicationStatus:
    ready = serving.ready
    variants: list[VariantStatus] = []
    reason: str | None = None
    for index, stage in enumerate(application.stages, start=1):
        for v in stage.variants:
            variants.append(VariantStatus(stage=index, model=v.model, version=v.version, weight=v.weight,
                                          ready_replicas=ready.get((v.model, v.version), 0)))  # fmt: skip
        for shadow in stage.shadows:
            variants.append(VariantStatus(stage=index, model=shadow.model, version=shadow.version, weight=None,
                                          ready_replicas=ready.get((shadow.model, shadow.version), 0)))  # fmt: skip
        starved = [v for v in stage.variants if v.weight > 0 and not ready.get((v.model, v.version))]
        if starved and reason is None:
            # Envoy sends a weighted variant's share to it whatever its health: those requests fail.
            names = ", ".join(f"{v.model}:{v.version} (weight {v.weight})" for v in starved)
            reason = f"stage {index}: no ready replica of {names}"
    if not application.needs_pipeline:
        return ApplicationStatus(ready=reason is None, reason=reason, variants=variants)
    pipelines = ready.get(application.name, 0)
    replicas = serving.pipeline_replicas.get(application.name, [])
    if not pipelines and reason is None:
        reason = "pipeline: no ready replica of its pipeline runtime" + _last_crash(replicas)
    return ApplicationStatus(
        ready=reason is None,
        reason=reason,
        variants=variants,
        pipeline_ready_replicas=pipelines,
        pipeline_replicas=[InstanceView.model_validate(r.model_dump(exclude=_NOT_IN_VIEW)) for r in replicas],
    )


def _last_crash(replicas: list[PipelineReplicaStatus]) -> str:
    """`` (replica p1 crash-looping: exited with code 1)``: the first line of a replica's last error, if any."""
    for replica in replicas:
        if replica.last_error:
            return f" (replica {replica.id} {replica.state}: {replica.last_error.splitlines()[0]})"
    return ""


@router.put("/{name}", response_model=ApplicationView, responses=CONDITIONAL_WRITE_RESPONSES)
async def put_application(name: ApplicationName, spec: ApplicationSpec, store: Store) -> ApplicationView:
    """Create or replace an application; the ingress follows within a push, with no restart.

    With ``revision`` (from a GET) the write happens only if nobody changed the application since: 409 otherwise.
    """
    application = await _check(store, name, spec)
    # A lost race (RevisionMismatch -> 409, ConflictError -> 503 + Retry-After) is answered by app.py's handlers.
    try:
        stored = await store.put_application(application, spec.revision)
    except VersionNotRegistered as exc:
        # Deleted since _check: the same 400 as if the delete had come first (a 503 would invite the same write).
        raise ApiProblem(400, f"{_where(spec, exc.model, exc.version)}: {exc}") from exc
    return _view(stored, await _serving(store))


def _where(spec: ApplicationSpec, model: str, version: int) -> str:
    """``stages[i]`` of the first stage naming the model version (as _check's messages say it)."""
    for index, stage in enumerate(spec.stages):
        members: list[Variant | ShadowVariant] = [*stage.variants, *stage.shadows]
        if any((m.model, m.version) == (model, version) for m in members):
            return f"stages[{index}]"
    return "stages"


@router.get("", response_model=list[ApplicationView])
async def list_applications(store: Store) -> list[ApplicationView]:
    stored = await store.read_applications()
    serving = await _serving(store)
    return [_view(one, serving) for one in stored]


@router.get("/{name}", response_model=ApplicationView)
async def get_application(name: ApplicationName, store: Store) -> ApplicationView:
    stored = await store.read_application(name)
    if stored is None:
        raise not_found(f"application {name!r}")
    return _view(stored, await _serving(store))


@router.delete("/{name}", status_code=204, responses=CONDITIONAL_WRITE_RESPONSES)
async def delete_application(name: ApplicationName, store: Store, revision: RevisionQuery = None) -> Response:
    if not await store.delete_application(name, revision):
        raise not_found(f"application {name!r}")
    return Response(status_code=204)
