"""FastAPI dependencies: the store, the artifact store and validated path names, shared by the routers.

All `async def`: FastAPI runs a plain `def` dependency on its thread pool, which cost a quarter of the manager's
request time under 50 clients (benchmarks/manager_api.py --profile); none of these block.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request

from manager_api.artifacts import ArtifactStore
from manager_api.errors import ApiProblem
from manager_api.store.topology_store import TopologyStore
from protos.topology.names import is_valid_name


async def get_store(request: Request) -> TopologyStore:
    store: TopologyStore = request.app.state.store
    return store


async def get_artifacts(request: Request) -> ArtifactStore:
    artifacts: ArtifactStore = request.app.state.artifacts
    return artifacts


def _checked_name(kind: str, name: str) -> str:
    if not is_valid_name(name):
        raise ApiProblem(
            400,
            f"invalid {kind} name {name!r}: use 1 to 63 lower-case letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit",
        )
    return name


async def model_name(model: Annotated[str, Path(description="model name")]) -> str:
    return _checked_name("model", model)


async def application_name(name: Annotated[str, Path(description="application name")]) -> str:
    return _checked_name("application", name)


Store = Annotated[TopologyStore, Depends(get_store)]
Artifacts = Annotated[ArtifactStore, Depends(get_artifacts)]
ModelName = Annotated[str, Depends(model_name)]
ApplicationName = Annotated[str, Depends(application_name)]
