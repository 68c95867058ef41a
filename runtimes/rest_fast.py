"""A short path for REST inference requests, in front of the FastAPI app.

FastAPI's middleware layers, routing and dependency solving cost about as much CPU as a small model's prediction
(measured with py-spy on the iris model: ~30% of the process under load, the endpoint itself ~14%). This ASGI
wrapper answers ``POST /v2/models/{model}[/versions/{version}]/infer`` itself, with the same handler and the same
error shapes as the FastAPI route, and passes every other request to the app unchanged.
"""

from __future__ import annotations

import logging
import re

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from runtimes.dataplane import DataPlane
from runtimes.errors import InferenceError
from runtimes.rest import error_response, infer_response

log = logging.getLogger("runtimes.rest")

# Starlette's {param} is [^/]+ over the decoded path: the same paths reach the same handler either way.
_INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")


def with_fast_infer(app: ASGIApp, dataplane: DataPlane, *, max_body_bytes: int) -> ASGIApp:
    """``app`` with inference requests answered directly; everything else still goes to ``app``."""

    async def fast(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = _INFER_PATH.fullmatch(scope["path"])
            if match is not None:
                request = Request(scope, receive)
                response = await _answer(dataplane, request, match.group(1), match.group(2) or "", max_body_bytes)
                await response(scope, receive, send)
                return
        await app(scope, receive, send)

    return fast


async def _answer(dataplane: DataPlane, request: Request, model: str, version: str, max_body_bytes: int) -> Response:
    try:
        return await infer_response(dataplane, request, model, version, max_body_bytes)
    except InferenceError as exc:
        if exc.http_status >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, exc)
        return error_response(exc.http_status, str(exc))
    except Exception as exc:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
