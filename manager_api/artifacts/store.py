"""Model archives by sha256: uploads checked before they are kept, and unpacked folders for the runtimes.

The archives as uploaded live in a BlobStore (the manager's disk by default, or an S3 bucket); what runtimes
load is a local cache of unpacked folders, ``{root}/folders/sha256/{hex}/``, refilled from the blob store (and
checked against the digest) when a folder is missing, e.g. on a manager replica that did not take the upload.
An upload is staged in ``{root}/staging/`` and checked (safe to unpack, a valid serving.yaml, every listed file
present) before anything is kept, so a bad upload leaves nothing behind. The same bytes uploaded twice are
stored once.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

from manager_api.archives import MAX_UNPACKED_BYTES, model_root, unpack_archive
from manager_api.artifacts.blobs import CHUNK, Blob, BlobStore, hex_of, verified
from manager_api.artifacts.local import LocalBlobs
from protos.topology.models import Artifact
from runtimes.serving_config import ServingConfig, load_serving_config
from runtimes.signatures import DEFAULT_TIMEOUT, verify_signature


class UploadTooLarge(ValueError):
    """The upload is bigger than the configured limit."""


@dataclass
class StagedUpload:
    """An upload written to staging and hashed, not yet checked or kept."""

    archive: Path
    digest: str
    size: int
    workdir: Path


class ArtifactStore:
    """Keeps model archives by sha256 in ``blobs`` (default: a directory under ``root``) and unpacks them."""

    def __init__(
        self,
        root: Path,
        max_upload_bytes: int = 2 * 1024**3,
        signature_timeout: float = DEFAULT_TIMEOUT,
        blobs: BlobStore | None = None,
    ) -> None:
        self.root = root
        self.max_upload_bytes = max_upload_bytes
        self.signature_timeout = signature_timeout
        self.blobs: BlobStore = LocalBlobs(root) if blobs is None else blobs
        self._staging = root / "staging"
        self._folders = root / "folders" / "sha256"
        for folder in (self._staging, self._folders):
            folder.mkdir(parents=True, exist_ok=True)

    @contextlib.asynccontextmanager
    async def staged(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[StagedUpload]:
        """Write an upload to staging while hashing it; staging is removed when the block ends."""
        workdir = Path(tempfile.mkdtemp(dir=self._staging))
        try:
            archive = workdir / "upload"
            sha = hashlib.sha256()
            size = 0
            with archive.open("wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_upload_bytes:
                        raise UploadTooLarge(f"the archive is larger than the limit of {self.max_upload_bytes} bytes")
                    sha.update(chunk)
                    out.write(chunk)
            yield StagedUpload(archive=archive, digest=f"sha256:{sha.hexdigest()}", size=size, workdir=workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def check(self, upload: StagedUpload) -> ServingConfig:
        """Unpack in staging, read serving.yaml and check the declared signature against the model itself.

        Blocking (the signature check loads the model in a child process): call it off the event loop.
        ArchiveError / ServingConfigError (SignatureMismatch naming the field among them) say what is wrong.
        """
        folder = unpack_archive(upload.archive, upload.workdir / "unpacked", MAX_UNPACKED_BYTES)
        config = load_serving_config(folder)
        verify_signature(folder, config, self.signature_timeout)
        return config

    def keep(self, upload: StagedUpload) -> Artifact:
        """Put a checked upload into the blob store (no-op if the same bytes are already there) and cache its folder.

        Blocking (it may upload to S3): call it off the event loop.
        """
        uri = self.blobs.put(upload.digest, _read_file(upload.archive))
        folder = self._folders / hex_of(upload.digest)
        if not folder.exists():
            with contextlib.suppress(OSError):
                (upload.workdir / "unpacked").replace(folder)
        return Artifact(digest=upload.digest, uri=uri, size=upload.size)

    def open(self, digest: str) -> Blob:
        """The archive of an artifact as uploaded (what agents on other hosts download); BlobNotFound if absent."""
        return self.blobs.open(digest)

    def materialize(self, digest: str) -> Path:
        """The unpacked model folder of an artifact, fetched from the blob store and unpacked if it is not cached.

        The archive is hashed as it is read: DigestMismatch if the stored bytes changed (nothing is unpacked then),
        BlobNotFound if it is not stored. Blocking: call it off the event loop.
        """
        folder = self._folders / hex_of(digest)
        if not folder.exists():
            with self._scratch() as scratch, self.blobs.open(digest) as blob:
                archive = scratch / "archive"
                with archive.open("wb") as out:
                    for chunk in verified(blob, digest, self.blobs.location):
                        out.write(chunk)
                unpack_archive(archive, scratch / "unpacked", MAX_UNPACKED_BYTES)
                # A concurrent materialize of the same digest may have won the race: theirs is as good as ours.
                with contextlib.suppress(OSError):
                    (scratch / "unpacked").replace(folder)
        return model_root(folder)

    @contextlib.contextmanager
    def _scratch(self) -> Iterator[Path]:
        scratch = Path(tempfile.mkdtemp(dir=self._staging))
        try:
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _read_file(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            yield chunk
