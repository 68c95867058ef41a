"""``/api/v1/applications``: named endpoints that split traffic across model versions by weight."""

from __future__ import annotations

from fastapi import APIRouter, Response

from manager_api.dependencies import ApplicationName, Store
from manager_api.errors import ApiProblem, not_found
from manager_api.schemas import (
    CONDITIONAL_WRITE_RESPONSES,
    ApplicationSpec,
    ApplicationStatus,
    ApplicationView,
    RevisionQuery,
    VariantStatus,
)
from manager_api.store import Stored, TopologyStore
from protos.contracts import ContractError, check_application, version_key
from protos.topology import Application, ShadowVariant, Signature, Variant

router = APIRouter(prefix="/applications", tags=["applications"])

#: Most stages of one application: each is a hop through the pipeline's sidecar and a share of its deadline.
MAX_STAGES = 16


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


#: Ready endpoints: per model version (``(model, version)``) and per application's pipeline (``app``).
Ready = dict[tuple[str, int] | str, int]


async def _ready_replicas(store: TopologyStore) -> Ready:
    """Ready instances per model version and ready pipeline runtimes per application (two reads for any number
    of applications)."""
    ready: Ready = {}
    for instance in await store.list_instances():
        if instance.state == "ready":
            key = (instance.model, instance.version)
            ready[key] = ready.get(key, 0) + 1
    for pipeline in await store.list_pipelines():
        if pipeline.state == "ready":
            ready[pipeline.app] = ready.get(pipeline.app, 0) + 1
    return ready


def _view(stored: Stored[Application], ready: Ready) -> ApplicationView:
    return ApplicationView(**stored.record.model_dump(), revision=stored.revision, status=_status(stored.record, ready))


def _status(application: Application, ready: Ready) -> ApplicationStatus:
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
    pipelines: int | None = None
    if application.needs_pipeline:
        pipelines = ready.get(application.name, 0)
        if not pipelines and reason is None:
            reason = "pipeline: no ready replica of its pipeline runtime"
    return ApplicationStatus(ready=reason is None, reason=reason, variants=variants, pipeline_ready_replicas=pipelines)


@router.put("/{name}", response_model=ApplicationView, responses=CONDITIONAL_WRITE_RESPONSES)
async def put_application(name: ApplicationName, spec: ApplicationSpec, store: Store) -> ApplicationView:
    """Create or replace an application; the ingress follows within a push, with no restart.

    With ``revision`` (from a GET) the write happens only if nobody changed the application since: 409 otherwise.
    """
    application = await _check(store, name, spec)
    # A lost race (RevisionMismatch -> 409, ConflictError -> 503 + Retry-After) is answered by app.py's handlers.
    stored = await store.put_application(application, spec.revision)
    return _view(stored, await _ready_replicas(store))


@router.get("", response_model=list[ApplicationView])
async def list_applications(store: Store) -> list[ApplicationView]:
    stored = await store.read_applications()
    ready = await _ready_replicas(store)
    return [_view(one, ready) for one in stored]


@router.get("/{name}", response_model=ApplicationView)
async def get_application(name: ApplicationName, store: Store) -> ApplicationView:
    stored = await store.read_application(name)
    if stored is None:
        raise not_found(f"application {name!r}")
    return _view(stored, await _ready_replicas(store))


@router.delete("/{name}", status_code=204, responses=CONDITIONAL_WRITE_RESPONSES)
async def delete_application(name: ApplicationName, store: Store, revision: RevisionQuery = None) -> Response:
    if not await store.delete_application(name, revision):
        raise not_found(f"application {name!r}")
    return Response(status_code=204)
