"""Every error the manager returns is JSON ``{"error": "..."}`` with a fitting status, never HTML or a trace."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from manager_api.schemas import ErrorBody

log = logging.getLogger(__name__)

#: The error answers every /api/v1 operation documents (FastAPI would otherwise document its own 422 body).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorBody, "description": "bad request: the message names the offending field or record"},
    "5XX": {"model": ErrorBody, "description": "the manager failed (e.g. etcd unreachable)"},
}


class ApiProblem(Exception):
    """Raised by routes: answered as ``status`` with ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        """The answer: ``status`` with ``{"error": message}`` and the headers it carries."""
        return JSONResponse(status_code=self.status, content={"error": self.message}, headers=self.headers)


def not_found(what: str) -> ApiProblem:
    return ApiProblem(404, f"{what} not found")


def describe_validation_errors(errors: Sequence[Any]) -> str:
    """One line naming each offending field, e.g. ``body.replicas: Input should be ... (got -1)``."""
    parts = []
    for err in errors:
        where = ".".join(str(p) for p in err.get("loc", ())) or "request"
        message = err.get("msg", "invalid")
        if "input" in err and err.get("type") not in ("missing", "json_invalid"):
            message += f" (got {err['input']!r})"[:200]
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def _json_error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


def install_error_handlers(app: FastAPI) -> None:
    """Map every failure mode of a request to a JSON error body."""

    @app.exception_handler(ApiProblem)
    async def _problem(_: Request, exc: ApiProblem) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return _json_error(exc.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            return _json_error(400, "the request body is not valid JSON")
        return _json_error(422, describe_validation_errors(errors))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Reached only by errors outside _AnswerUnexpected (in other middleware): Starlette re-raises after it.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return unexpected_error(exc)

    app.add_middleware(_AnswerUnexpected)


def unexpected_error(exc: Exception) -> JSONResponse:
    """The JSON 500 of a failure nobody foresaw, naming the exception."""
    return _json_error(500, f"internal error: {type(exc).__name__}: {exc}")


class _AnswerUnexpected:
    """ASGI middleware answering an unexpected exception with a JSON 500, and keeping the connection.

    Starlette's own 500 handler re-raises the exception once it has answered, and uvicorn then closes the
    connection: a keep-alive client's next request on it fails with a reset instead of an answer. Here the
    exception stops, logged. Once a response has started (a stream) nothing can be answered: it is re-raised.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            await unexpected_error(exc)(scope, receive, send)
