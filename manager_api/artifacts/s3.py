"""The artifact store in an S3-compatible bucket (AWS S3, MinIO, SeaweedFS, ...): ``{prefix}sha256/{hex}``.

boto3 rather than aioboto3: every store call already runs off the event loop (uploads are checked in a thread,
the deployer materializes in a thread, the download route iterates in Starlette's thread pool), boto3's client is
thread-safe, and it avoids aiobotocore's exact pins on botocore.

A put streams: parts of ``part_size`` bytes (at most two in memory) go up as a multipart upload while the bytes
are hashed, and the upload is completed only if they hash to the digest, aborted otherwise; an archive smaller
than one part is a single PutObject sent after its hash was checked. Either way no object appears under a digest
its bytes do not have. Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
AWS_PROFILE, instance roles); the endpoint from ``endpoint`` or AWS_ENDPOINT_URL(_S3) for S3-compatible servers.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from manager_api.artifacts.blobs import CHUNK, ArtifactStoreUnavailable, Blob, BlobNotFound, DigestMismatch, hex_of

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

#: S3's smallest part (but the last) is 5 MiB; 8 MiB keeps 2 GiB archives far below the 10,000-part limit.
DEFAULT_PART_SIZE = 8 * 1024 * 1024
_MIN_PART_SIZE = 5 * 1024 * 1024


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://BUCKET[/PREFIX]`` as (bucket, prefix); a non-empty prefix ends with "/"."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ArtifactStoreUnavailable(f"invalid artifact store {url!r}: expected s3://BUCKET or s3://BUCKET/PREFIX")
    prefix = parts.path.strip("/")
    return parts.netloc, f"{prefix}/" if prefix else ""


class S3Blobs:
    """A BlobStore in one bucket under one key prefix."""

    def __init__(self, client: S3Client, bucket: str, prefix: str = "", part_size: int = DEFAULT_PART_SIZE) -> None:
        if part_size < _MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {_MIN_PART_SIZE} bytes (S3's minimum)")
        self._client = client
        self.bucket = bucket
        self.prefix = prefix
        self.part_size = part_size
        self.location = f"s3://{bucket}/{prefix}"

    @classmethod
    def connect(cls, url: str, endpoint: str | None = None, part_size: int = DEFAULT_PART_SIZE) -> S3Blobs:
        """Open ``s3://BUCKET/PREFIX`` and check the bucket answers; ArtifactStoreUnavailable says why not."""
        bucket, prefix = parse_s3_url(url)
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        config = Config(
            connect_timeout=5,
            read_timeout=60,
            retries={"mode": "standard", "max_attempts": 3},
            # S3-compatible servers are addressed by host:port: the bucket goes in the path, not the host name.
            s3={"addressing_style": "path" if endpoint else "auto"},
        )
        client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
        store = cls(client, bucket, prefix, part_size)
        store.check(endpoint or "AWS S3")
        return store

    def check(self, endpoint: str) -> None:
        """HeadBucket, with each way it fails turned into a sentence naming the fix."""
        where = f"artifact store {self.location} ({endpoint})"
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except NoCredentialsError as exc:
            raise ArtifactStoreUnavailable(
                f"{where}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
            ) from exc
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = exc.response.get("Error", {}).get("Code", "")
            if status == 404 or code in ("404", "NoSuchBucket"):
                raise ArtifactStoreUnavailable(f"{where}: bucket {self.bucket!r} does not exist") from exc
            if status in (401, 403):
                raise ArtifactStoreUnavailable(
                    f"{where}: access to bucket {self.bucket!r} denied; check AWS_ACCESS_KEY_ID, "
                    "AWS_SECRET_ACCESS_KEY and the bucket's policy"
                ) from exc
            raise ArtifactStoreUnavailable(f"{where}: HeadBucket failed with HTTP {status} {code}") from exc
        except BotoCoreError as exc:
            raise ArtifactStoreUnavailable(f"{where}: cannot reach the endpoint: {exc}") from exc

    def key(self, digest: str) -> str:
        return f"{self.prefix}sha256/{hex_of(digest)}"

    def has(self, digest: str) -> bool:
        with self._failures("HeadObject"):
            try:
                self._client.head_object(Bucket=self.bucket, Key=self.key(digest))
            except ClientError as exc:
                if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    return False
                raise
        return True

    @contextlib.contextmanager
    def _failures(self, what: str) -> Iterator[None]:
        """S3 errors as ArtifactStoreUnavailable (the API answers 503), naming the store and the call."""
        try:
            yield
        except (BotoCoreError, ClientError) as exc:
            raise ArtifactStoreUnavailable(f"artifact store {self.location}: {what} failed: {exc}") from exc

    def put(self, digest: str, chunks: Iterable[bytes]) -> str:
        if self.has(digest):
            return self.uri(digest)
        parts = _parts(chunks, self.part_size)
        first = next(parts, b"")
        second = next(parts, None)
        with self._failures("upload"):
            if second is None:
                self._check(digest, hashlib.sha256(first).hexdigest())
                self._client.put_object(Bucket=self.bucket, Key=self.key(digest), Body=first)
            else:
                self._multipart(digest, itertools.chain((first, second), parts))
        return self.uri(digest)

    def _multipart(self, digest: str, parts: Iterable[bytes]) -> None:
        key = self.key(digest)
        upload_id = self._client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        sha = hashlib.sha256()
        done: list[CompletedPartTypeDef] = []
        try:
            for number, part in enumerate(parts, start=1):
                sha.update(part)
                etag = self._client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=part
                )["ETag"]
                done.append({"PartNumber": number, "ETag": etag})
            self._check(digest, sha.hexdigest())
            self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": done}
            )
        except BaseException:
            # Nothing was completed: aborting frees the parts, and no object ever appeared under the digest. If the
            # abort fails too (the endpoint is gone), the bucket's lifecycle rule for incomplete uploads cleans up.
            with contextlib.suppress(BotoCoreError, ClientError):
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise

    def _check(self, digest: str, hexdigest: str) -> None:
        if f"sha256:{hexdigest}" != digest:
            raise DigestMismatch(
                f"artifact {digest} for {self.location}: its bytes hash to sha256:{hexdigest}; refusing it"
            )

    def open(self, digest: str) -> Blob:
        with self._failures("GetObject"):
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=self.key(digest))
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    raise BlobNotFound(f"artifact {digest} is not in the store at {self.location}") from exc
                raise
        body = response["Body"]
        return Blob(response["ContentLength"], body.iter_chunks(CHUNK), body.close)

    def delete(self, digest: str) -> None:
        with self._failures("DeleteObject"):
            self._client.delete_object(Bucket=self.bucket, Key=self.key(digest))

    def uri(self, digest: str) -> str:
        return f"s3://{self.bucket}/{self.key(digest)}"


def _parts(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """Re-cut ``chunks`` into pieces of exactly ``size`` bytes (the last one shorter), holding one in memory."""
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        while len(buffer) >= size:
            yield bytes(buffer[:size])
            del buffer[:size]
    if buffer:
        yield bytes(buffer)
