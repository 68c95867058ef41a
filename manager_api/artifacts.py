"""Content-addressed store of model archives on the manager's disk.

``{root}/blobs/sha256/{hex}`` is the archive as uploaded; ``{root}/folders/sha256/{hex}/`` is it unpacked, which
is what runtimes load. An upload is staged in ``{root}/staging/`` and checked (safe to unpack, a valid
serving.yaml, every listed file present) before anything is kept, so a bad upload leaves nothing behind.
The same bytes uploaded twice are stored once.
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
from protos.topology import Artifact
from runtimes.serving_config import ServingConfig, load_serving_config
from runtimes.signatures import DEFAULT_TIMEOUT, verify_signature

_CHUNK = 1024 * 1024


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
    """Keeps model archives by sha256 and hands out their unpacked folders."""

    def __init__(
        self, root: Path, max_upload_bytes: int = 2 * 1024**3, signature_timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.root = root
        self.max_upload_bytes = max_upload_bytes
        self.signature_timeout = signature_timeout
        self._staging = root / "staging"
        self._blobs = root / "blobs" / "sha256"
        self._folders = root / "folders" / "sha256"
        for folder in (self._staging, self._blobs, self._folders):
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
        """Move a checked upload into the store (no-op if the same bytes are already there)."""
        hexdigest = upload.digest.split(":", 1)[1]
        blob = self._blobs / hexdigest
        if not blob.exists():
            upload.archive.replace(blob)
        folder = self._folders / hexdigest
        if not folder.exists():
            with contextlib.suppress(OSError):
                (upload.workdir / "unpacked").replace(folder)
        return Artifact(digest=upload.digest, uri=blob.as_uri(), size=upload.size)

    def blob(self, digest: str) -> Path | None:
        """The archive of an artifact as uploaded (what agents on other hosts download), None if not stored."""
        blob = self._blobs / digest.split(":", 1)[1]
        return blob if blob.is_file() else None

    def materialize(self, digest: str) -> Path:
        """The unpacked model folder of an artifact, unpacking the blob again if the folder is gone."""
        hexdigest = digest.split(":", 1)[1]
        folder = self._folders / hexdigest
        if not folder.exists():
            blob = self._blobs / hexdigest
            if not blob.exists():
                raise FileNotFoundError(f"artifact {digest} is not in the store at {self.root}")
            with self._scratch() as scratch:
                unpack_archive(blob, scratch / "unpacked")
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
