"""``/api/v1/applications``: named endpoints that split traffic across model versions by weight."""

from __future__ import annotations

from fastapi import APIRouter, Response

from manager_api.dependencies import ApplicationName, Store
from manager_api.errors import ApiProblem, not_found
from manager_api.schemas import CONDITIONAL_WRITE_RESPONSES, ApplicationSpec, ApplicationView, RevisionQuery
from manager_api.store import Stored, TopologyStore
from protos.contracts import ContractError, check_application, version_key
from protos.topology import Application, ShadowVariant, Signature, Variant

router = APIRouter(prefix="/applications", tags=["applications"])

#: Pipelines (several stages) come with the applications issue; one stage is served today.
MAX_STAGES = 1


async def _check(store: TopologyStore, name: str, spec: ApplicationSpec) -> Application:
    """The application record, once its weights, references and contract between stages are right."""
    if len(spec.stages) > MAX_STAGES:
        raise ApiProblem(400, f"stages: {len(spec.stages)} given, only {MAX_STAGES} stage is supported")
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
        members: list[Variant | ShadowVariant] = [*stage.variants, *stage.shadows]
        for member in members:
            registered = await store.get_model_version(member.model, member.version)
            if registered is None:
                raise ApiProblem(400, f"{where}: model version {member.model}:{member.version} is not registered")
            signatures[version_key(member.model, member.version)] = registered.signature
    application = Application(name=name, stages=spec.stages)
    try:
        check_application(application, signatures)
    except ContractError as exc:
        raise ApiProblem(400, f"contract between model versions: {exc}") from exc
    return application


def _view(stored: Stored[Application]) -> ApplicationView:
    return ApplicationView(**stored.record.model_dump(), revision=stored.revision)


@router.put("/{name}", response_model=ApplicationView, responses=CONDITIONAL_WRITE_RESPONSES)
async def put_application(name: ApplicationName, spec: ApplicationSpec, store: Store) -> ApplicationView:
    """Create or replace an application; the ingress follows within a push, with no restart.

    With ``revision`` (from a GET) the write happens only if nobody changed the application since: 409 otherwise.
    """
    application = await _check(store, name, spec)
    # A lost race (RevisionMismatch -> 409, ConflictError -> 503 + Retry-After) is answered by app.py's handlers.
    return _view(await store.put_application(application, spec.revision))


@router.get("", response_model=list[ApplicationView])
async def list_applications(store: Store) -> list[ApplicationView]:
    return [_view(stored) for stored in await store.read_applications()]


@router.get("/{name}", response_model=ApplicationView)
async def get_application(name: ApplicationName, store: Store) -> ApplicationView:
    stored = await store.read_application(name)
    if stored is None:
        raise not_found(f"application {name!r}")
    return _view(stored)


@router.delete("/{name}", status_code=204, responses=CONDITIONAL_WRITE_RESPONSES)
async def delete_application(name: ApplicationName, store: Store, revision: RevisionQuery = None) -> Response:
    if not await store.delete_application(name, revision):
        raise not_found(f"application {name!r}")
    return Response(status_code=204)
