"""``/api/v1/artifacts``: model archives by digest, for `hydro agent`s on other hosts (read-only)."""

from __future__ import annotations

import re

from fastapi import APIRouter
from fastapi.responses import FileResponse

from manager_api.dependencies import Artifacts
from manager_api.errors import ApiProblem

router = APIRouter(prefix="/artifacts", tags=["artifacts"])

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


@router.get(
    "/{digest}",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "the archive as uploaded"}},
)
async def download_artifact(digest: str, artifacts: Artifacts) -> FileResponse:
    """The archive a model version was registered from; its sha256 is the digest in the URL."""
    if not _DIGEST.match(digest):
        raise ApiProblem(400, f"invalid artifact digest {digest!r}: expected sha256: and 64 lower-case hex digits")
    blob = artifacts.blob(digest)
    if blob is None:
        raise ApiProblem(404, f"artifact {digest} not found")
    return FileResponse(blob, media_type="application/octet-stream")
