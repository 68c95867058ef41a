"""manager_api/request_bodies.py on a small app in process: a chunked body (no Content-Length) over its limit is cut
off with a JSON 413 while it is read, and a body within it reaches the route unchanged.

test_hostile_input.py checks the same middleware in the real manager with declared lengths.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
from fastapi import FastAPI, File, UploadFile

from manager_api.errors import install_error_handlers
from manager_api.request_bodies import RequestBodies

LIMIT = 64 * 1024


def small_app(max_upload_bytes: int = LIMIT) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(RequestBodies, max_upload_bytes=max_upload_bytes, max_json_bytes=LIMIT)

    @app.put("/api/v1/things/{name}")
    async def put_thing(name: str, body: dict[str, Any]) -> dict[str, Any]:
        return body

    @app.post("/api/v1/models/{model}/versions")
    async def upload(model: str, archive: Annotated[UploadFile, File()]) -> dict[str, int]:
        return {"size": len(await archive.read())}

    return app


async def chunks(total: int, size: int = 8192) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        yield b" " * min(size, total - sent)
        sent += size


async def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app=small_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.request(method, path, **kwargs)


def test_a_chunked_json_body_over_the_limit_is_a_json_413() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b'{"a": "'
        async for chunk in chunks(2 * LIMIT):
            yield chunk
        yield b'"}'

    response = asyncio.run(
        call("PUT", "/api/v1/things/x", content=body(), headers={"content-type": "application/json"})
    )
    assert response.status_code == 413, response.text
    assert response.json() == {"error": f"the request body is larger than the limit of {LIMIT} bytes"}


def test_a_chunked_upload_over_the_limit_is_a_json_413() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="archive"; filename="m"\r\n\r\n'
        async for chunk in chunks(2 * LIMIT):
            yield chunk
        yield b"\r\n--b--\r\n"

    headers = {"content-type": "multipart/form-data; boundary=b"}
    response = asyncio.run(call("POST", "/api/v1/models/m/versions", content=body(), headers=headers))
    assert response.status_code == 413, response.text
    assert "--max-upload-mb" in response.json()["error"]


def test_bodies_within_the_limit_reach_the_route_unchanged() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b'{"a": 1, '
        yield b'"b": {"a": 2}}'  # the same key in two objects is no duplicate

    response = asyncio.run(
        call("PUT", "/api/v1/things/x", content=body(), headers={"content-type": "application/json"})
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"a": 1, "b": {"a": 2}}
    upload = asyncio.run(call("POST", "/api/v1/models/m/versions", files={"archive": ("m", b"x" * 1000)}))
    assert upload.json() == {"size": 1000}


def test_a_body_that_is_not_json_is_left_to_the_route() -> None:
    response = asyncio.run(
        call("PUT", "/api/v1/things/x", content=b"{nope", headers={"content-type": "application/json"})
    )
    assert response.status_code == 400
    assert response.json() == {"error": "the request body is not valid JSON"}


def test_a_json_body_on_the_upload_route_gets_the_json_limit() -> None:
    # JSON bodies are held in memory to look for duplicate keys: never one as large as an upload may be.
    async def body() -> AsyncIterator[bytes]:
        yield b'{"a": "'
        async for chunk in chunks(2 * LIMIT):
            yield chunk
        yield b'"}'

    app = small_app(max_upload_bytes=100 * LIMIT)

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            headers = {"content-type": "application/json"}
            return await client.post("/api/v1/models/m/versions", content=body(), headers=headers)

    response = asyncio.run(post())
    assert response.status_code == 413, response.text
    assert f"limit of {LIMIT} bytes" in response.json()["error"]


def test_a_closing_boundary_split_across_chunks_is_found() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b'--bound\r\nContent-Disposition: form-data; name="archive"; filename="m"\r\n\r\nabc\r\n--bo'
        yield b"und-"
        yield b"-\r\n"

    headers = {"content-type": "multipart/form-data; boundary=bound"}
    response = asyncio.run(call("POST", "/api/v1/models/m/versions", content=body(), headers=headers))
    assert response.status_code == 200, response.text
    assert response.json() == {"size": 3}
