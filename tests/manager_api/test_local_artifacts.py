"""The default artifact store, a directory: the same digest contract as the S3 one (test_s3_artifacts.py)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from manager_api.artifacts import ArtifactStore, ArtifactStoreUnavailable, BlobNotFound, DigestMismatch, open_blob_store
from manager_api.artifacts.local import LocalBlobs


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def model_archive() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in (("serving.yaml", b"runtime: python\n"), ("model.py", b"x = 1\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_a_put_is_kept_under_its_digest_and_read_back(tmp_path: Path) -> None:
    blobs = LocalBlobs(tmp_path)
    data = b"archive bytes" * 1000
    uri = blobs.put(digest_of(data), [data[:10], data[10:]])
    assert uri == (tmp_path / "blobs" / "sha256" / digest_of(data)[7:]).as_uri()
    with blobs.open(digest_of(data)) as blob:
        assert blob.size == len(data)
        assert b"".join(blob) == data


def test_a_put_whose_bytes_do_not_match_leaves_nothing(tmp_path: Path) -> None:
    blobs = LocalBlobs(tmp_path)
    claimed = digest_of(b"other")
    with pytest.raises(DigestMismatch, match="refusing it"):
        blobs.put(claimed, [b"these bytes"])
    assert not blobs.has(claimed)
    assert not list((tmp_path / "staging").iterdir())


def test_putting_a_stored_digest_again_reads_nothing(tmp_path: Path) -> None:
    blobs = LocalBlobs(tmp_path)
    blobs.put(digest_of(b"once"), [b"once"])

    def exploding() -> Iterator[bytes]:
        raise AssertionError("the bytes of a stored digest were read again")
        yield b""

    assert blobs.put(digest_of(b"once"), exploding()) == blobs.uri(digest_of(b"once"))


def test_a_digest_is_never_used_as_a_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid artifact digest"):
        LocalBlobs(tmp_path).has("sha256:../../etc/passwd")
    with pytest.raises(BlobNotFound, match=f"artifact sha256:{'0' * 64} is not in the store"):
        LocalBlobs(tmp_path).open("sha256:" + "0" * 64)


def test_a_blob_changed_on_disk_is_refused_at_materialize(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    data = model_archive()
    store.blobs.put(digest_of(data), [data])
    (tmp_path / "blobs" / "sha256" / digest_of(data)[7:]).write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(DigestMismatch, match=f"artifact {digest_of(data)} at {tmp_path}"):
        store.materialize(digest_of(data))
    assert not list((tmp_path / "folders" / "sha256").iterdir())


def test_the_store_location_is_a_directory_or_s3(tmp_path: Path) -> None:
    assert isinstance(open_blob_store(None, tmp_path), LocalBlobs)
    other = open_blob_store(str(tmp_path / "elsewhere"), tmp_path)
    assert other.location == str(tmp_path / "elsewhere")
    for bad in ("gs://bucket", "s3://", "s3:///prefix"):
        with pytest.raises(ArtifactStoreUnavailable, match="artifact store"):
            open_blob_store(bad, tmp_path)
