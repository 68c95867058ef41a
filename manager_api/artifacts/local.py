"""The default artifact store: ``{root}/blobs/sha256/{hex}`` on the manager's disk.

A put is written to ``{root}/staging/`` while it is hashed and renamed into place only if the digest matches,
so a reader never sees a partial or wrong archive under a digest.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from manager_api.artifacts.blobs import CHUNK, Blob, BlobNotFound, hex_of, verified


class LocalBlobs:
    """A BlobStore in a directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)
        self._blobs = root / "blobs" / "sha256"
        self._staging = root / "staging"
        for folder in (self._blobs, self._staging):
            folder.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self._blobs / hex_of(digest)

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def put(self, digest: str, chunks: Iterable[bytes]) -> str:
        target = self.path(digest)
        if target.is_file():
            return self.uri(digest)
        fd, name = tempfile.mkstemp(dir=self._staging, prefix="put-")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in verified(chunks, digest, self.location):
                    out.write(chunk)
            # Two puts of the same digest may race: both wrote the same verified bytes, either rename wins.
            os.replace(name, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
        return self.uri(digest)

    def open(self, digest: str) -> Blob:
        path = self.path(digest)
        try:
            handle = path.open("rb")
        except FileNotFoundError as exc:
            raise BlobNotFound(f"artifact {digest} is not in the store at {self.location}") from exc
        return Blob(os.fstat(handle.fileno()).st_size, _read(handle), handle.close)

    def delete(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def uri(self, digest: str) -> str:
        return self.path(digest).as_uri()


def _read(handle: BinaryIO) -> Iterator[bytes]:
    while chunk := handle.read(CHUNK):
        yield chunk
