"""FastAPI dependencies: the store, the artifact store and validated path names, shared by the routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request

from manager_api.artifacts import ArtifactStore
from manager_api.errors import ApiProblem
from manager_api.store import TopologyStore
from protos.topology import is_valid_name


def get_store(request: Request) -> TopologyStore:
    store: TopologyStore = request.app.state.store
    return store


def get_artifacts(request: Request) -> ArtifactStore:
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


def model_name(model: Annotated[str, Path(description="model name")]) -> str:
    return _checked_name("model", model)


def application_name(name: Annotated[str, Path(description="application name")]) -> str:
    return _checked_name("application", name)


Store = Annotated[TopologyStore, Depends(get_store)]
Artifacts = Annotated[ArtifactStore, Depends(get_artifacts)]
ModelName = Annotated[str, Depends(model_name)]
ApplicationName = Annotated[str, Depends(application_name)]
