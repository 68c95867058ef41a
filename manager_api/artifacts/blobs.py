"""What an artifact store is: archives kept by their sha256 digest, whatever holds the bytes.

Two implementations: a directory on the manager's disk (local.py, the default) and an S3-compatible bucket (s3.py).
Every method blocks and is safe to call from several threads at once: callers run them off the event loop.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Protocol

#: Bytes read or written at a time when streaming an archive.
CHUNK = 1024 * 1024

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class BlobNotFound(LookupError):
    """No archive with that digest in the store."""


class DigestMismatch(ValueError):
    """Bytes that do not hash to the digest they are stored or read under."""


class ArtifactStoreUnavailable(RuntimeError):
    """The store cannot be used: bucket missing, credentials refused, endpoint unreachable, bad location."""


def hex_of(digest: str) -> str:
    """The hex part of ``sha256:<64 hex>``; ValueError for anything else (a digest is never trusted as a path)."""
    if not _DIGEST.match(digest):
        raise ValueError(f"invalid artifact digest {digest!r}: expected sha256: and 64 lower-case hex digits")
    return digest.split(":", 1)[1]


def verified(chunks: Iterable[bytes], digest: str, where: str) -> Iterator[bytes]:
    """Pass ``chunks`` through, then raise DigestMismatch if they did not hash to ``digest``.

    The check fires after the last chunk, so a consumer must not commit what it wrote before the iterator ends.
    """
    sha = hashlib.sha256()
    for chunk in chunks:
        sha.update(chunk)
        yield chunk
    actual = f"sha256:{sha.hexdigest()}"
    if actual != digest:
        raise DigestMismatch(f"artifact {digest} at {where}: its bytes hash to {actual}; refusing it")


class Blob:
    """An archive open for reading: its size, its bytes as chunks, and ``close`` (also as a context manager)."""

    def __init__(self, size: int, chunks: Iterator[bytes], close: Callable[[], None]) -> None:
        self.size = size
        self._chunks = chunks
        self._close = close

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks

    def close(self) -> None:
        self._close()

    def __enter__(self) -> Blob:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


class BlobStore(Protocol):
    """Archives by digest. ``put`` is idempotent and verifying; nothing partial is ever visible under a digest."""

    #: Where the archives are, for messages and logs (a directory, or s3://bucket/prefix).
    location: str

    def has(self, digest: str) -> bool:
        """Whether an archive is stored under ``digest``."""
        ...

    def put(self, digest: str, chunks: Iterable[bytes]) -> str:
        """Store ``chunks`` under ``digest`` and return its URI.

        The bytes are hashed while they stream in and DigestMismatch refuses them (keeping nothing) if they do
        not hash to ``digest``. If ``digest`` is already stored, nothing is written and ``chunks`` is not read.
        """
        ...

    def open(self, digest: str) -> Blob:
        """The stored archive, streamed; BlobNotFound if there is none. The caller closes it."""
        ...

    def delete(self, digest: str) -> None:
        """Forget the archive under ``digest`` (no error if there is none)."""
        ...

    def uri(self, digest: str) -> str:
        """Where the archive of ``digest`` is (file:// or s3://), as recorded in model versions."""
        ...
