"""``/api/v1/instances``: the ready runtime instances registered by deployers (read-only)."""

from __future__ import annotations

from fastapi import APIRouter

from manager_api.dependencies import Store
from protos.topology.instances import Instance

router = APIRouter(prefix="/instances", tags=["instances"])


@router.get("", response_model=list[Instance])
async def list_instances(store: Store) -> list[Instance]:
    return await store.list_instances()
