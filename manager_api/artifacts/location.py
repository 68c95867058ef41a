"""Which artifact store a manager uses, from its ``--artifact-store`` value."""

from __future__ import annotations

from pathlib import Path

from manager_api.artifacts.blobs import ArtifactStoreUnavailable, BlobStore
from manager_api.artifacts.local import LocalBlobs
from manager_api.artifacts.s3 import S3Blobs


def open_blob_store(location: str | None, default_root: Path, s3_endpoint: str | None = None) -> BlobStore:
    """``s3://BUCKET/PREFIX`` (checked to answer), a directory, or None for ``default_root``.

    ArtifactStoreUnavailable says in one sentence what is wrong; it is meant to end the process without a traceback.
    """
    if location is None:
        return LocalBlobs(default_root)
    if location.startswith("s3://"):
        return S3Blobs.connect(location, s3_endpoint)
    if "://" in location:
        raise ArtifactStoreUnavailable(
            f"unsupported artifact store {location!r}: use s3://BUCKET/PREFIX or a directory"
        )
    return LocalBlobs(Path(location).resolve())
