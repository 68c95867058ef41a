"""Content-addressed model archives: the upload checks (store.py) over a local or S3 blob store (blobs.py)."""

from manager_api.artifacts.blobs import ArtifactStoreUnavailable, Blob, BlobNotFound, BlobStore, DigestMismatch
from manager_api.artifacts.location import open_blob_store
from manager_api.artifacts.store import ArtifactStore, StagedUpload, UploadTooLarge

__all__ = [
    "ArtifactStore",
    "ArtifactStoreUnavailable",
    "Blob",
    "BlobNotFound",
    "BlobStore",
    "DigestMismatch",
    "StagedUpload",
    "UploadTooLarge",
    "open_blob_store",
]
