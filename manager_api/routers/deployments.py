"""``/api/v1/deployments``: how many replicas of each model version run, and how each is doing; scaling is a PUT."""

from __future__ import annotations

from fastapi import APIRouter, Response

from manager_api.dependencies import ModelName, Store
from manager_api.errors import not_found
from manager_api.schemas import (
    CONDITIONAL_WRITE_RESPONSES,
    DeploymentSpec,
    DeploymentView,
    InstanceView,
    RevisionQuery,
)
from manager_api.store.records import Stored
from manager_api.store.topology_store import TopologyStore
from protos.topology.deployments import Deployment

router = APIRouter(prefix="/deployments", tags=["deployments"])

#: Fields of a ReplicaStatus that its deployment's view already says.
_NOT_IN_VIEW = {"schema_version", "model", "version"}


async def _view(store: TopologyStore, stored: Stored[Deployment]) -> DeploymentView:
    deployment = stored.record
    endpoints = await store.list_instances(deployment.model, deployment.version)
    statuses = await store.list_replica_statuses(deployment.model, deployment.version)
    instances = [InstanceView.model_validate(s.model_dump(exclude=_NOT_IN_VIEW)) for s in statuses]
    return DeploymentView(
        **deployment.model_dump(),
        revision=stored.revision,
        ready_replicas=sum(1 for i in endpoints if i.state == "ready"),
        instances=instances,
    )


@router.put("/{model}/{version}", response_model=DeploymentView, responses=CONDITIONAL_WRITE_RESPONSES)
async def put_deployment(model: ModelName, version: int, spec: DeploymentSpec, store: Store) -> DeploymentView:
    """Create or scale the deployment of a registered model version, and set its traffic policies.

    With ``revision`` (from a GET) the write happens only if nobody changed the deployment since: 409 otherwise.
    """
    if await store.get_model_version(model, version) is None:
        raise not_found(f"model version {model}:{version}")
    try:
        stored = await store.put_deployment(model, version, spec.replicas, spec.policies, spec.revision)
    except KeyError as exc:  # the version was deleted between the check and the write
        raise not_found(f"model version {model}:{version}") from exc
    return await _view(store, stored)


@router.get("", response_model=list[DeploymentView])
async def list_deployments(store: Store) -> list[DeploymentView]:
    return [await _view(store, d) for d in await store.read_deployments()]


@router.get("/{model}/{version}", response_model=DeploymentView)
async def get_deployment(model: ModelName, version: int, store: Store) -> DeploymentView:
    stored = await store.read_deployment(model, version)
    if stored is None:
        raise not_found(f"deployment {model}:{version}")
    return await _view(store, stored)


@router.delete("/{model}/{version}", status_code=204, responses=CONDITIONAL_WRITE_RESPONSES)
async def delete_deployment(model: ModelName, version: int, store: Store, revision: RevisionQuery = None) -> Response:
    """Stop every replica of the model version (applications naming it answer 503 until re-routed)."""
    if not await store.delete_deployment(model, version, revision):
        raise not_found(f"deployment {model}:{version}")
    return Response(status_code=204)
