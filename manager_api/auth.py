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


async def authorize(request: Request) -> None:
    """FastAPI dependency of every /api/v1 route: 401 without a known token, 403 for a viewer that writes."""
    store: TokenStore | None = request.app.state.tokens
    if store is None:
        return  # auth disabled (loopback-only manager without --tokens)
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiProblem(401, "missing bearer token: send 'Authorization: Bearer <token>'")
    role = store.role_of(token.strip())
    if role is None:
        raise ApiProblem(401, "unknown bearer token")
    if role != "admin" and request.method not in READ_METHODS:
        raise ApiProblem(403, f"the {role} role can only read; {request.method} needs an admin token")
