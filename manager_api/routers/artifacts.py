"""``/api/v1/artifacts``: model archives by digest, for `hydro agent`s on other hosts (read-only)."""

from __future__ import annotations

import re
from collections.abc import Iterator

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from manager_api.artifacts import Blob, BlobNotFound
from manager_api.dependencies import Artifacts
from manager_api.errors import ApiProblem

router = APIRouter(prefix="/artifacts", tags=["artifacts"])

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


@router.get(
    "/{digest}",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "the archive as uploaded"}},
)
async def download_artifact(digest: str, artifacts: Artifacts) -> StreamingResponse:
    """The archive a model version was registered from, streamed from the artifact store; its sha256 is the digest."""
    if not _DIGEST.match(digest):
        raise ApiProblem(400, f"invalid artifact digest {digest!r}: expected sha256: and 64 lower-case hex digits")
    try:
        # Opening may be a network call (S3 GetObject): off the event loop, like the chunks that follow.
        blob = await run_in_threadpool(artifacts.open, digest)
    except BlobNotFound as exc:
        raise ApiProblem(404, f"artifact {digest} not found") from exc
    return StreamingResponse(
        _stream(blob), media_type="application/octet-stream", headers={"content-length": str(blob.size)}
    )


def _stream(blob: Blob) -> Iterator[bytes]:
    # Starlette iterates a sync generator in its thread pool; closing here also runs when the client goes away.
    with blob:
        yield from blob
