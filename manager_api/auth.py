"""Bearer-token authorization of the REST API: ``viewer`` tokens read, ``admin`` tokens also write.

Tokens live in a JSON file (``--tokens``) as ``[{"name": ..., "role": "admin"|"viewer", "sha256": ...}]``: only
their hashes are stored, and a presented token is hashed and compared to each in constant time, so neither the
file nor response timing gives a token away. ``hydro up`` creates the file and an admin token for the CLI.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import Request
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from manager_api.errors import ApiProblem

Role = Literal["admin", "viewer"]
ROLES: tuple[Role, ...] = ("admin", "viewer")
#: Methods a viewer may use; everything else changes state and needs an admin.
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class TokenFileError(ValueError):
    """The tokens file is missing, not JSON, or holds an entry without a valid role and hash."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random bearer token (256 bits)."""
    return "hydro_" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class TokenEntry:
    name: str
    role: Role
    sha256: str


class TokenStore:
    """The known tokens; ``role_of`` answers which role a presented token has, if any."""

    def __init__(self, entries: list[TokenEntry]) -> None:
        self._entries = entries

    @classmethod
    def load(cls, path: Path) -> TokenStore:
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise TokenFileError(f"cannot read the tokens file {path}: {exc}") from exc
        if not isinstance(raw, list):
            raise TokenFileError(f"{path}: expected a JSON list of {{name, role, sha256}}")
        entries = []
        for index, item in enumerate(raw):
            if not isinstance(item, dict) or item.get("role") not in ROLES or len(str(item.get("sha256", ""))) != 64:
                raise TokenFileError(f"{path}: entry {index} needs a role (admin or viewer) and a sha256 of the token")
            entries.append(
                TokenEntry(name=str(item.get("name", f"token-{index}")), role=item["role"], sha256=item["sha256"])
            )
        return cls(entries)

    def role_of(self, token: str) -> Role | None:
        presented = hash_token(token)
        found: Role | None = None
        for entry in self._entries:
            # Every entry is compared, match or not, so the time taken does not tell which one matched.
            if hmac.compare_digest(presented, entry.sha256):
                found = entry.role
        return found


def write_token_file(path: Path, tokens: dict[str, tuple[Role, str]]) -> None:
    """Write ``{name: (role, token)}`` as a tokens file (hashes only), readable by its owner alone."""
    entries = [{"name": name, "role": role, "sha256": hash_token(token)} for name, (role, token) in tokens.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries, indent=2))
    path.chmod(0o600)


#: Routes that need a token; /healthz and the OpenAPI document are open.
API_PREFIX = "/api/v1/"


def authorization_problem(store: TokenStore | None, method: str, header: str) -> ApiProblem | None:
    """Why a request with this method and Authorization header is refused (401/403), or None if it may go on."""
    if store is None:
        return None  # auth disabled (loopback-only manager without --tokens)
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        # RFC 6750: a 401 names the scheme the client should use.
        return ApiProblem(
            401,
            "missing bearer token: send 'Authorization: Bearer <token>'",
            {"WWW-Authenticate": 'Bearer realm="hydro"'},
        )
    role = store.role_of(token.strip())
    if role is None:
        return ApiProblem(
            401, "unknown bearer token", {"WWW-Authenticate": 'Bearer realm="hydro", error="invalid_token"'}
        )
    if role != "admin" and method not in READ_METHODS:
        return ApiProblem(403, f"the {role} role can only read; {method} needs an admin token")
    return None


async def authorize(request: Request) -> None:
    """FastAPI dependency of every /api/v1 route: 401 without a known token, 403 for a viewer that writes.

    RequireToken has already answered such requests before their body was read; this declares the requirement
    on the routes (and holds where the app runs without that middleware).
    """
    problem = authorization_problem(request.app.state.tokens, request.method, request.headers.get("authorization", ""))
    if problem is not None:
        raise problem


class RequireToken:
    """ASGI middleware: the token check of ``authorize``, made before anything reads the request body.

    FastAPI reads and parses a body before it runs any dependency: without this, a client with no token could make
    the manager take in and spool a whole upload, and learn from a 400/422 what was wrong with a body.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(API_PREFIX):
            tokens: TokenStore | None = scope["app"].state.tokens
            header = Headers(scope=scope).get("authorization", "")
            problem = authorization_problem(tokens, scope["method"], header)
            if problem is not None:
                await problem.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
