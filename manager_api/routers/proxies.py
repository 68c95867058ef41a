"""``/api/v1/proxies``: every Envoy connected to xds_control, what it acknowledged and its last rejection."""

from __future__ import annotations

from fastapi import APIRouter

from manager_api.dependencies import Store
from manager_api.errors import not_found
from protos.topology.proxies import ProxyStatus

router = APIRouter(prefix="/proxies", tags=["proxies"])


@router.get("", response_model=list[ProxyStatus])
async def list_proxies(store: Store) -> list[ProxyStatus]:
    """Connected proxies; a NACKed config shows in ``last_nack`` while the proxy keeps its last good one."""
    return await store.list_proxies()


@router.get("/{node_id}", response_model=ProxyStatus)
async def get_proxy(node_id: str, store: Store) -> ProxyStatus:
    proxy = await store.get_proxy(node_id)
    if proxy is None:
        raise not_found(f"proxy {node_id!r}")
    return proxy
