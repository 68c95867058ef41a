"""Request bodies checked before any route reads them: a size limit (413), JSON sent as JSON (415) and without
duplicate keys (400), uploads that reach their closing boundary (400).

Without the limit, FastAPI reads a JSON body whole into memory, and Starlette spools a multipart upload whole to
a temporary file, before the route (and its own upload limit) sees a byte: a client that declares or sends
gigabytes costs that much memory or disk, and one that declares more than it sends holds the request open for
ever. Here a declared ``Content-Length`` over the limit is answered at once, and a chunked body is cut off as
soon as it passes the limit.

Duplicate keys (``{"replicas": 1, "replicas": 0}``) are legal JSON whose meaning parsers disagree on (Python
keeps the last, others the first): the writer almost certainly meant something else, so it is refused with the
key named rather than one of the two applied silently.
"""

from __future__ import annotations

import email.message
import json
import re
from collections.abc import Callable
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Largest JSON body (bytes). The largest real one, an application of 16 stages with policies, is a few KiB.
MAX_JSON_BODY_BYTES = 1024**2
#: Room for the multipart framing (boundaries, part headers) around an uploaded archive.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
#: Methods whose bodies the routes read (a body on any other method is ignored).
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
#: The one route that takes an archive upload; every other body is JSON.
_UPLOAD_PATH = re.compile(r"^/api/v1/models/[^/]+/versions/?$")


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a body passes its limit; an HTTPException so that FastAPI, which turns other
    errors met while reading a body into a generic 400, passes it on to the JSON error handlers."""

    def __init__(self, message: str) -> None:
        super().__init__(status_code=413, detail=message)


class MalformedBody(HTTPException):
    """Raised from ``receive`` at the end of a body that cannot be whole; an HTTPException like BodyTooLarge."""

    def __init__(self, message: str) -> None:
        super().__init__(status_code=400, detail=message)


class RequestBodies:
    """ASGI middleware enforcing the body limit of each request and refusing JSON bodies with duplicate keys."""

    def __init__(self, app: ASGIApp, max_upload_bytes: int, max_json_bytes: int = MAX_JSON_BODY_BYTES) -> None:
        self.app = app
        self.max_upload_bytes = max_upload_bytes
        self.max_json_bytes = max_json_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        content_type = headers.get("content-type", "")
        is_json = _is_json(content_type)
        is_upload = scope["method"] == "POST" and _UPLOAD_PATH.match(scope["path"]) is not None
        if not is_json and not is_upload and scope["method"] in _BODY_METHODS and _has_body(headers):
            # `curl -d` sends a form content type: FastAPI's answer, a 422 quoting the bytes, does not say this.
            shown = f"got {content_type!r}" if content_type else "none was given"
            message = f"the request body must be JSON, sent with Content-Type: application/json ({shown})"
            await _error(415, message)(scope, receive, send)
            return
        # A JSON body gets the JSON limit on any path: it is held in memory here, to look for duplicate keys.
        if not is_json and is_upload:
            limit = self.max_upload_bytes + MULTIPART_OVERHEAD_BYTES
            message = f"the upload is larger than the limit of {self.max_upload_bytes} bytes (--max-upload-mb)"
        else:
            limit = self.max_json_bytes
            message = f"the request body is larger than the limit of {limit} bytes"
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            # Answered without reading the body: uvicorn closes the connection rather than drain it.
            await _error(413, message)(scope, receive, send)
            return
        limited = _limited(receive, limit, message)
        boundary = _boundary(content_type) if is_upload else None
        if boundary is not None:
            limited = _closed_multipart(limited, boundary)
        if is_json:
            try:
                body = await _read_all(limited)
            except BodyTooLarge as exc:
                await _error(413, exc.detail)(scope, receive, send)
                return
            problem = _duplicate_key_problem(body)
            if problem is not None:
                await _error(400, problem)(scope, receive, send)
                return
            limited = _replay(body, receive)
        started = False

        async def tracking_send(event: Message) -> None:
            nonlocal started
            started = started or event["type"] == "http.response.start"
            await send(event)

        try:
            await self.app(scope, limited, tracking_send)
        except (BodyTooLarge, MalformedBody) as exc:
            # Routes' handlers answer it; this is for a body read outside them (nothing was answered yet).
            if started:
                raise
            await _error(exc.status_code, exc.detail)(scope, receive, send)


def _has_body(headers: Headers) -> bool:
    return headers.get("content-length", "0") != "0" or "chunked" in headers.get("transfer-encoding", "").lower()


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _limited(receive: Receive, limit: int, message: str) -> Receive:
    received = 0

    async def limited() -> Message:
        nonlocal received
        event = await receive()
        if event["type"] == "http.request":
            received += len(event.get("body", b""))
            if received > limit:
                raise BodyTooLarge(message)
        return event

    return limited


def _boundary(content_type: str) -> bytes | None:
    """The boundary of a multipart/form-data content type, or None."""
    header = email.message.Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary") if header.get_content_type() == "multipart/form-data" else None
    return boundary.encode("latin-1", "replace") if isinstance(boundary, str) and boundary else None


def _closed_multipart(receive: Receive, boundary: bytes) -> Receive:
    """``receive``, raising a 400 at the end of a multipart body that never reached its closing boundary.

    The multipart parser takes a body cut short (a client or proxy that gave up half way) for a complete one
    without the part it was in, and the route then says the field is missing, as if the client forgot it.
    """
    closing = b"--" + boundary + b"--"
    tail = b""
    closed = False

    async def checked() -> Message:
        nonlocal tail, closed
        event = await receive()
        if event["type"] == "http.request":
            window = tail + event.get("body", b"")
            closed = closed or closing in window  # searched with the previous chunk's tail: it may straddle two
            tail = window[-(len(closing) - 1) :]
            if not event.get("more_body", False) and not closed:
                raise MalformedBody("the multipart body ends before its closing boundary: the upload was cut short")
        return event

    return checked


async def _read_all(receive: Receive) -> bytes:
    chunks = []
    while True:
        event = await receive()
        if event["type"] != "http.request":  # the client went away: the route will see an empty body
            break
        chunks.append(event.get("body", b""))
        if not event.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body as one message, then whatever the server says next (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _duplicate_key_problem(body: bytes) -> str | None:
    """Why a JSON body is refused for a duplicate key, or None (also for a body that is not JSON at all: the
    route answers that itself)."""
    duplicates: list[str] = []
    try:
        json.loads(body, object_pairs_hook=_pair_checker(duplicates))
    except RecursionError:
        return "the request body is not valid JSON: it nests too deeply"
    except ValueError:
        return None
    if duplicates:
        return f"the request body has the key {duplicates[0]!r} twice in one object: send it once"
    return None


def _pair_checker(duplicates: list[str]) -> Callable[[list[tuple[str, Any]]], None]:
    def check(pairs: list[tuple[str, Any]]) -> None:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                duplicates.append(key)
            seen.add(key)
        # Only the keys matter here: the route parses the body again, so no object is built.

    return check


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})
