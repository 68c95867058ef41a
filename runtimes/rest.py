"""The Open Inference Protocol over HTTP/JSON: an ASGI app in front of the data plane.

Every error, including unknown routes, wrong methods and unreadable bodies, is JSON ``{"error": "..."}`` with its
status, so clients (and the mesh's own error mapping) never see HTML or FastAPI's validation format.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from opentelemetry.trace import Span
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from runtimes import json_codec
from runtimes.dataplane import APPLICATION_HEADER, DataPlane
from runtimes.errors import ClientDisconnected, InferenceError, InvalidInput, ModelNotReady, PayloadTooLarge
from runtimes.spans import describe_request, inference_span
from runtimes.statistics import snapshot_json
from tracing.provider import active_tracer

log = logging.getLogger(__name__)

SERVER_NAME = "hydro-serving"
#: Protocol extensions this server implements, as reported by server metadata (Triton's names).
EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics"]


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """The one error shape of the REST API."""
    # json_codec.dumps, not JSONResponse: messages quote client-sent names, which may hold lone surrogates that
    # JSONResponse's UTF-8 encoding would turn into a crash inside the error handler.
    return Response(
        json_codec.dumps({"error": message}), status_code=status, headers=headers, media_type="application/json"
    )


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    # gzip and deflate as tritonclient sends them; the limit guards against a small body inflating without bound.
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise InvalidInput(f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none")
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"the request body is not valid {encoding} data: {exc}") from None
    if len(data) > limit:
        raise PayloadTooLarge(f"the decompressed request body is larger than the {limit // 2**20} MiB limit")
    # Under the limit, all the input was consumed: a stream without its end (the checksum comes last, so a body cut
    # there still inflates to the whole JSON) was cut short, and bytes past the end belong to no stream.
    if not inflater.eof:
        raise InvalidInput(f"the request body is cut short: the {encoding} stream ends before its end marker")
    if inflater.unused_data:
        raise InvalidInput(
            f"the request body has {len(inflater.unused_data)} bytes after the end of its {encoding} stream"
        )
    return data


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, decompressed (gzip, deflate); PayloadTooLarge as soon as it, or what it inflates to,
    goes over ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body ({declared} bytes) is larger than the {limit // 2**20} MiB limit")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the request body is larger than the {limit // 2**20} MiB limit")
            chunks.append(chunk)
    except ClientDisconnect:
        # An aborted upload (or Envoy giving up on the request) is no server failure: logged once, at info.
        message = "the client disconnected before sending its whole body"
        log.info("%s %s: %s", request.method, request.url.path, message)
        raise ClientDisconnected(message) from None
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        body = _decompress(body, encoding, limit)
    return body


async def infer_response(
    dataplane: DataPlane, request: Request, model: str, version: str, max_body_bytes: int
) -> Response:
    """Answer one POST .../infer (the FastAPI route and the fast path of runtimes.rest_fast share it)."""
    app_name = request.headers.get(APPLICATION_HEADER)
    tracer = active_tracer()
    if tracer is None:
        return await _infer(dataplane, request, model, version, app_name, max_body_bytes, None)
    with inference_span(tracer, "rest", request.headers, model, version, app_name) as span:
        return await _infer(dataplane, request, model, version, app_name, max_body_bytes, span)


async def _infer(
    dataplane: DataPlane,
    request: Request,
    model: str,
    version: str,
    app_name: str | None,
    max_body_bytes: int,
    span: Span | None,
) -> Response:
    # Refuse wrong addresses before reading a possibly large body.
    dataplane.resolve(model, version, app_name)
    body = await read_body(request, max_body_bytes)
    infer_request = json_codec.parse_infer_request(body, model, version, request.headers.get(json_codec.HEADER_LENGTH))
    if span is not None:
        describe_request(span, infer_request)
    response = await dataplane.infer(infer_request, app_name)
    encoded = json_codec.encode_infer_response(response, infer_request)
    return Response(encoded.body, media_type=encoded.media_type, headers=encoded.headers)


def create_app(dataplane: DataPlane, *, server_version: str, max_body_bytes: int = 64 * 2**20) -> FastAPI:
    """The REST app serving ``dataplane``; ``max_body_bytes`` caps request bodies (after decompression)."""
    app = FastAPI(title="Hydro Serving runtime", docs_url=None, redoc_url=None, openapi_url=None)

    def application(request: Request) -> str | None:
        return request.headers.get(APPLICATION_HEADER)

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        if not dataplane.ready:
            raise ModelNotReady(
                f"model {dataplane.name!r} version {dataplane.version} is not ready ({dataplane.state})"
            )
        return JSONResponse({"ready": True})

    @app.get("/metrics")
    async def metrics() -> Response:
        # Prometheus text format: batch sizes and queue times of the adaptive batcher, when it is on.
        return Response(generate_latest(dataplane.metrics), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": server_version, "extensions": EXTENSIONS}

    async def metadata(request: Request, model: str, version: str) -> Response:
        meta = dataplane.model_metadata(model, version, application(request))
        return JSONResponse(json_codec.encode_metadata(meta))

    async def model_ready(request: Request, model: str, version: str) -> Response:
        if not dataplane.model_ready(model, version, application(request)):
            raise ModelNotReady(f"model {model!r} is not ready ({dataplane.state})")
        return JSONResponse({"name": dataplane.name, "version": dataplane.version_string, "ready": True})

    async def infer(request: Request, model: str, version: str) -> Response:
        return await infer_response(dataplane, request, model, version, max_body_bytes)

    async def config(request: Request, model: str, version: str) -> Response:
        meta = dataplane.model_metadata(model, version, application(request))
        return JSONResponse(json_codec.encode_model_config(meta))

    async def stats(request: Request, model: str, version: str) -> Response:
        snapshot = dataplane.model_statistics(model, version, application(request))
        return JSONResponse({"model_stats": [snapshot_json(dataplane.name, dataplane.version_string, snapshot)]})

    # Before /v2/models/{model}: Triton's "statistics of every model" path, not a model named "stats".
    @app.get("/v2/models/stats")
    async def all_stats(request: Request) -> Response:
        return await stats(request, "", "")

    # Separate routes for "any version" and "this version": one handler with an optional path parameter would
    # also accept ?version= as a query parameter.
    def versioned(method: str, suffix: str, handler: Callable[[Request, str, str], Awaitable[Response]]) -> None:
        async def any_version(request: Request, model: str) -> Response:
            return await handler(request, model, "")

        async def one_version(request: Request, model: str, version: str) -> Response:
            return await handler(request, model, version)

        app.add_api_route(f"/v2/models/{{model}}{suffix}", any_version, methods=[method])
        app.add_api_route(f"/v2/models/{{model}}/versions/{{version}}{suffix}", one_version, methods=[method])

    versioned("GET", "", metadata)
    versioned("GET", "/ready", model_ready)
    versioned("GET", "/config", config)
    versioned("GET", "/stats", stats)
    versioned("POST", "/infer", infer)

    async def on_inference_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, InferenceError)
        if exc.http_status >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, exc)
        return error_response(exc.http_status, str(exc))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            message = f"no route for {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed for {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, dict(exc.headers or {}))

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return error_response(400, f"invalid request: {details}")

    async def on_unexpected_error(request: Request, exc: Exception) -> Response:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    app.add_exception_handler(InferenceError, on_inference_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected_error)
    return app
