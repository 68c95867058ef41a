"""The Open Inference Protocol over HTTP/JSON for a pipeline, plus its Prometheus metrics at /metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtimes import json_codec
from runtimes.errors import ClientDisconnected, InferenceError
from runtimes.messages import InferRequest
from runtimes.pipeline.executor import STAGES_HEADER, PipelineResult
from runtimes.pipeline.service import PipelineService
from runtimes.pipeline.spans import request_span
from runtimes.rest import EXTENSIONS, SERVER_NAME, error_response, read_body
from runtimes.spans import describe_request
from tracing.provider import active_tracer

log = logging.getLogger(__name__)

T = TypeVar("T")


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result; if the client disconnects first, ``work`` is cancelled (and with it the stage call in
    flight, which grpc.aio cancels on the wire) and ClientDisconnected raised.

    Uvicorn does not cancel a handler whose client went away: without this, every stage would still be called for
    nobody, up to the pipeline's time budget. A gRPC caller's cancellation already cancels the servicer's task.
    """
    handler = asyncio.current_task()
    assert handler is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        # The body has been read: the next message is the disconnect (or the end of the response).
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        handler.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise  # the server's own cancellation (shutdown), not the client's
        handler.uncancel()
        message = "the client disconnected before the pipeline answered"
        log.info("%s %s: %s", request.method, request.url.path, message)
        raise ClientDisconnected(message) from None
    finally:
        watcher.cancel()


def create_app(service: PipelineService, *, server_version: str, max_body_bytes: int = 64 * 2**20) -> FastAPI:
    """The REST app of one pipeline."""
    app = FastAPI(title="Hydro Serving pipeline", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        service.check_ready()
        return JSONResponse({"ready": True})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": server_version, "extensions": EXTENSIONS}

    # Before /v2/models/{model}: Triton's "statistics of every model" path, not an application named "stats".
    @app.get("/v2/models/stats")
    async def all_stats() -> Response:
        service.statistics("")

    @app.get("/v2/models/{model}")
    async def metadata(model: str) -> Response:
        return JSONResponse(json_codec.encode_metadata(service.metadata(model)))

    @app.get("/v2/models/{model}/ready")
    async def model_ready(model: str) -> Response:
        service.resolve(model)
        service.check_ready()
        return JSONResponse({"name": service.name, "ready": True})

    @app.get("/v2/models/{model}/config")
    async def config(model: str) -> Response:
        service.config(model)

    @app.get("/v2/models/{model}/stats")
    async def stats(model: str) -> Response:
        service.statistics(model)

    async def _send_shadows(result: PipelineResult) -> None:
        # A coroutine function: Starlette would run a plain function on a worker thread.
        service.send_shadows(result)

    async def run(request: Request, model: str) -> tuple[InferRequest, PipelineResult]:
        body = await read_body(request, max_body_bytes)
        header_length = request.headers.get(json_codec.HEADER_LENGTH)
        infer_request = json_codec.parse_infer_request(body, model, "", header_length)
        return infer_request, await until_disconnected(request, service.infer(infer_request))

    @app.post("/v2/models/{model}/infer")
    async def infer(request: Request, model: str) -> Response:
        service.resolve(model)
        tracer = active_tracer()
        if tracer is None:
            infer_request, result = await run(request, model)
        else:
            with request_span(tracer, "rest", request.headers, service.name) as span:
                infer_request, result = await run(request, model)
                describe_request(span, infer_request)
                span.set_attribute("hydro.stages", result.stages_header)
        encoded = json_codec.encode_infer_response(service.response(result, infer_request), infer_request)
        headers = {**encoded.headers, STAGES_HEADER: result.stages_header}
        # Starlette runs a background task after the whole body is sent: the shadows start only then.
        background = BackgroundTask(_send_shadows, result) if result.shadows else None
        return Response(encoded.body, media_type=encoded.media_type, headers=headers, background=background)

    @app.api_route("/v2/models/{model}/versions/{version}{rest:path}", methods=["GET", "POST"])
    async def versioned(model: str, version: str, rest: str) -> Response:
        service.resolve(model, version)
        raise AssertionError("resolve accepts no version")

    async def on_inference_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, InferenceError)
        if exc.http_status >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, exc)
        return error_response(exc.http_status, str(exc))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            return error_response(404, f"no route for {request.method} {request.url.path}")
        if exc.status_code == 405:
            return error_response(405, f"method {request.method} is not allowed for {request.url.path}")
        return error_response(exc.status_code, str(exc.detail))

    async def on_unexpected_error(request: Request, exc: Exception) -> Response:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    app.add_exception_handler(InferenceError, on_inference_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected_error)
    return app
