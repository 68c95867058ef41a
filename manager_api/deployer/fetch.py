"""Model folders on a host that is not the manager's: archives downloaded by digest from the manager API.

`hydro agent` cannot read the manager's artifact store, so it keeps its own cache: ``{root}/folders/sha256/{hex}``
is an archive fetched from ``GET /api/v1/artifacts/{digest}``, checked against its digest, then unpacked. The
download and the unpacking happen in a scratch folder and are moved into place whole, so an interrupted fetch
leaves nothing that looks complete. Blocking: the deployer calls ``materialize`` off its event loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
from pathlib import Path

import httpx

from manager_api.archives import MAX_UNPACKED_BYTES, model_root, unpack_archive

_CHUNK = 1024 * 1024


class ArtifactFetchError(RuntimeError):
    """The manager did not hand out the artifact, or what it sent does not match the digest."""


class FetchedArtifacts:
    """The ModelFolders of an agent: a local cache of unpacked archives, filled from the manager API."""

    def __init__(self, root: Path, manager_url: str, token: str | None, timeout: float = 60.0) -> None:
        self.root = root
        self._url = manager_url.rstrip("/") + "/api/v1/artifacts/"
        self._headers = {"authorization": f"Bearer {token}"} if token else {}
        self._timeout = timeout
        self._folders = root / "folders" / "sha256"
        self._scratch = root / "scratch"
        for folder in (self._folders, self._scratch):
            folder.mkdir(parents=True, exist_ok=True)

    def materialize(self, digest: str) -> Path:
        """The unpacked model folder of ``digest``, downloaded first if it is not cached yet."""
        folder = self._folders / digest.split(":", 1)[1]
        if not folder.exists():
            scratch = Path(tempfile.mkdtemp(dir=self._scratch))
            try:
                archive = scratch / "archive"
                self._download(digest, archive)
                unpack_archive(archive, scratch / "unpacked", MAX_UNPACKED_BYTES)
                # Another fetch of the same digest may have won the race: theirs is as good as ours.
                with contextlib.suppress(OSError):
                    (scratch / "unpacked").replace(folder)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        return model_root(folder)

    def _download(self, digest: str, target: Path) -> None:
        sha = hashlib.sha256()
        with httpx.stream("GET", self._url + digest, headers=self._headers, timeout=self._timeout) as response:
            if response.is_error:
                response.read()
                raise ArtifactFetchError(f"GET artifact {digest}: HTTP {response.status_code} {response.text[:200]}")
            with target.open("wb") as out:
                for chunk in response.iter_bytes(_CHUNK):
                    sha.update(chunk)
                    out.write(chunk)
        if f"sha256:{sha.hexdigest()}" != digest:
            raise ArtifactFetchError(f"artifact {digest}: the download has sha256:{sha.hexdigest()}")
