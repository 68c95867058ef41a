"""The S3 artifact store against a real S3-compatible server and real `python -m manager_api` processes.

The server is SeaweedFS (`weed mini`, tests/s3_server.py): a stand-in for AWS S3 or MinIO, which is
what production points at (docs/artifacts.md). It is a real object store (SigV4 credentials, multipart uploads),
not a mock, but it is not AWS: behaviour specific to AWS (regions, IAM policies) is not covered here.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from manager_under_test import SERVING_YAML, python_model_archive
from s3_server import ACCESS_KEY, SECRET_KEY, SeaweedS3, aws_env

from manager_api.artifacts import ArtifactStore, DigestMismatch
from manager_api.artifacts.s3 import S3Blobs
from manager_api.deployer.fetch import ArtifactFetchError, FetchedArtifacts
from manager_api.etcd_server import EtcdServer
from manager_api.ports import free_port
from manager_api.processes import ChildProcess, http_ok, wait_until

PREFIX = "team-a"


def archive(factor: int) -> bytes:
    """A .tar.gz of a python model multiplying by ``factor`` (each factor is another digest)."""
    return python_model_archive(f"def predict(inputs):\n    return {{'y': inputs['x'] * {factor}}}\n".encode())


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    with SeaweedS3(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(scope="module")
def store_url(s3: SeaweedS3) -> str:
    return f"s3://{s3.bucket}/{PREFIX}"


def start_manager(
    etcd: EtcdServer, prefix: str, data_dir: Path, argv: list[str], env: dict[str, str]
) -> tuple[ChildProcess, str]:
    port = free_port()
    process = ChildProcess(
        "manager_api",
        [
            *(sys.executable, "-m", "manager_api", "--etcd", etcd.endpoint, "--prefix", prefix),
            *("--data-dir", str(data_dir), "--port", str(port), "--log-level", "warning", *argv),
        ],
        env=env,
        log_path=data_dir / "manager.log",
    ).start()
    url = f"http://127.0.0.1:{port}"
    try:
        process.wait_ready(lambda: http_ok(f"{url}/healthz"), 60)
    except BaseException:
        process.stop()
        raise
    return process, url


@pytest.fixture(scope="module")
def manager(
    etcd_server: EtcdServer, s3: SeaweedS3, store_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """A manager keeping archives in the bucket; the endpoint given as --s3-endpoint, the keys in the env."""
    data_dir = tmp_path_factory.mktemp("manager")
    env = aws_env(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    argv = ["--artifact-store", store_url, "--s3-endpoint", s3.endpoint]
    process, url = start_manager(etcd_server, "/hydro-s3-test/", data_dir, argv, env)
    try:
        yield url, data_dir
    finally:
        process.stop()


def bucket_store(s3: SeaweedS3, part_size: int = 5 * 1024 * 1024) -> S3Blobs:
    """The manager's bucket and prefix, opened in this process (with the smallest part size S3 allows)."""
    return S3Blobs(s3.client(), s3.bucket, f"{PREFIX}/", part_size=part_size)


def upload(url: str, name: str, data: bytes) -> httpx.Response:
    return httpx.post(f"{url}/api/v1/models/{name}/versions", files={"archive": ("model.tar.gz", data)}, timeout=60)


def keys_under(s3: SeaweedS3, prefix: str) -> dict[str, str]:
    listing = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=prefix)
    return {item["Key"]: item["ETag"] for item in listing.get("Contents", [])}


def test_an_upload_is_stored_in_the_bucket_under_its_digest(
    manager: tuple[str, Path], s3: SeaweedS3, store_url: str
) -> None:
    url, data_dir = manager
    data = archive(2)
    response = upload(url, "double", data)
    assert response.status_code == 201, response.text
    artifact = response.json()["artifact"]
    hexdigest = hashlib.sha256(data).hexdigest()
    key = f"{PREFIX}/sha256/{hexdigest}"
    stored = {k: artifact[k] for k in ("digest", "uri", "size")}
    assert stored == {"digest": f"sha256:{hexdigest}", "uri": f"s3://{s3.bucket}/{key}", "size": len(data)}
    # The unpacked folder's digest and files (what runtimes check before loading) are recorded too.
    assert set(artifact["files"]) == {"model.py", "serving.yaml"} and artifact["folder_digest"].startswith("sha256:")
    assert s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read() == data
    # The bucket is the store: the manager's disk keeps no archive (only the unpacked folder it caches).
    assert not list((data_dir / "artifacts" / "blobs" / "sha256").glob("*"))


def test_the_download_route_streams_the_archive_from_the_bucket(manager: tuple[str, Path]) -> None:
    url, _ = manager
    data = archive(3)
    assert upload(url, "triple", data).status_code == 201
    response = httpx.get(f"{url}/api/v1/artifacts/{digest_of(data)}", timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-length"] == str(len(data))
    assert response.content == data
    missing = httpx.get(f"{url}/api/v1/artifacts/sha256:{'0' * 64}", timeout=30)
    assert missing.status_code == 404
    assert "not found" in missing.json()["error"]


def test_uploading_the_same_bytes_again_stores_nothing_new(manager: tuple[str, Path], s3: SeaweedS3) -> None:
    url, _ = manager
    data = archive(4)
    first = upload(url, "quad", data)
    assert first.status_code == 201, first.text
    before = keys_under(s3, PREFIX)
    second = upload(url, "quad", data)
    assert second.status_code == 201, second.text
    assert second.json()["version"] == first.json()["version"] + 1
    assert second.json()["artifact"] == first.json()["artifact"]
    assert keys_under(s3, PREFIX) == before
    assert not s3.client().list_multipart_uploads(Bucket=s3.bucket).get("Uploads")


def test_a_manager_with_an_empty_cache_materializes_from_the_bucket(
    manager: tuple[str, Path], s3: SeaweedS3, store_url: str, tmp_path: Path
) -> None:
    url, _ = manager
    data = archive(5)
    assert upload(url, "quintuple", data).status_code == 201
    # Another manager replica (or this one after losing its disk) shares only the bucket.
    store = ArtifactStore(tmp_path, blobs=bucket_store(s3))
    folder = store.materialize(digest_of(data))
    assert (folder / "serving.yaml").read_bytes() == SERVING_YAML
    assert "* 5" in (folder / "model.py").read_text()
    assert not list((tmp_path / "staging").iterdir()), "materialize left its scratch folder behind"


def test_a_deploy_on_a_manager_that_never_saw_the_upload_fetches_it_from_the_bucket(
    manager: tuple[str, Path], s3: SeaweedS3, store_url: str, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    url, _ = manager
    data = archive(6)
    assert upload(url, "sextuple", data).status_code == 201
    # A second manager replica on the same etcd prefix, running the deployer; its endpoint from AWS_ENDPOINT_URL.
    env = aws_env(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_ENDPOINT_URL=s3.endpoint)
    argv = ["--artifact-store", store_url, "--deployer", "process", "--xds", f"127.0.0.1:{free_port()}"]
    process, replica_url = start_manager(etcd_server, "/hydro-s3-test/", tmp_path, argv, env)
    try:
        response = httpx.put(f"{replica_url}/api/v1/deployments/sextuple/1", json={"replicas": 1}, timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["replicas"] == 1, response.text
        folder = tmp_path / "artifacts" / "folders" / "sha256" / hashlib.sha256(data).hexdigest()
        wait_until(lambda: (folder / "model.py").is_file(), 60, "the deployer's copy of the model folder")
        assert "* 6" in (folder / "model.py").read_text()
        assert not list((tmp_path / "artifacts" / "blobs" / "sha256").glob("*"))
    finally:
        httpx.delete(f"{replica_url}/api/v1/deployments/sextuple/1", timeout=30)
        process.stop(grace=30)


def test_tampered_bytes_in_the_bucket_are_refused(manager: tuple[str, Path], s3: SeaweedS3, tmp_path: Path) -> None:
    url, _ = manager
    data = archive(7)
    digest = digest_of(data)
    assert upload(url, "septuple", data).status_code == 201
    s3.client().put_object(Bucket=s3.bucket, Key=f"{PREFIX}/sha256/{digest[7:]}", Body=archive(8))
    store = ArtifactStore(tmp_path / "replica", blobs=bucket_store(s3))
    with pytest.raises(DigestMismatch, match=rf"artifact {digest} at s3://{s3.bucket}/{PREFIX}/: its bytes hash to "):
        store.materialize(digest)
    assert not list((tmp_path / "replica" / "folders" / "sha256").iterdir()), "a wrong archive was unpacked"
    assert not list((tmp_path / "replica" / "staging").iterdir())
    # An agent on another host downloads through the manager, which streams what the bucket holds: it refuses too.
    with pytest.raises(ArtifactFetchError, match="the download has"):
        FetchedArtifacts(tmp_path / "agent", url, None).materialize(digest)


def test_a_put_whose_bytes_do_not_match_the_digest_leaves_nothing(s3: SeaweedS3) -> None:
    store = bucket_store(s3)
    small, big = b"small archive", os.urandom(11 * 1024 * 1024)
    for data in (small, big):
        claimed = digest_of(data + b"x")
        with pytest.raises(DigestMismatch, match="refusing it"):
            store.put(claimed, iter([data[: len(data) // 3], data[len(data) // 3 :]]))
        assert not store.has(claimed)
    assert not s3.client().list_multipart_uploads(Bucket=s3.bucket).get("Uploads")


def test_a_big_put_goes_up_in_parts_and_reads_back_whole(s3: SeaweedS3) -> None:
    store = bucket_store(s3)
    data = os.urandom(11 * 1024 * 1024 + 17)
    digest = digest_of(data)
    assert store.put(digest, (data[i : i + 65536] for i in range(0, len(data), 65536))) == store.uri(digest)
    head = s3.client().head_object(Bucket=s3.bucket, Key=store.key(digest))
    # A multipart object's ETag is "<md5 of the part md5s>-<number of parts>": 5 MiB parts make three.
    assert head["ETag"].strip('"').endswith("-3")
    with store.open(digest) as blob:
        assert blob.size == len(data)
        assert b"".join(blob) == data


def test_putting_a_stored_digest_again_reads_nothing(s3: SeaweedS3) -> None:
    store = bucket_store(s3)
    data = b"stored once"
    store.put(digest_of(data), [data])

    def exploding() -> Iterator[bytes]:
        raise AssertionError("the bytes of a stored digest were read again")
        yield b""

    assert store.put(digest_of(data), exploding()) == store.uri(digest_of(data))


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("missing bucket", "bucket 'no-such-bucket' does not exist"),
        ("wrong secret", "access to bucket 'hydro-artifacts' denied; check AWS_ACCESS_KEY_ID"),
        ("no credentials", "no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        ("unreachable endpoint", "cannot reach the endpoint"),
        ("bad location", "unsupported artifact store 'gs://bucket'"),
    ],
)
def test_a_store_that_cannot_be_used_stops_the_manager_with_one_clear_line(
    s3: SeaweedS3, tmp_path: Path, case: str, fragment: str
) -> None:
    keys = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    location, endpoint = f"s3://{s3.bucket}/{PREFIX}", s3.endpoint
    if case == "missing bucket":
        location = "s3://no-such-bucket/x"
    elif case == "wrong secret":
        keys["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    elif case == "no credentials":
        keys = {}
    elif case == "unreachable endpoint":
        endpoint = f"http://127.0.0.1:{free_port()}"
    else:
        location = "gs://bucket"
    argv = [
        *(sys.executable, "-m", "manager_api", "--etcd", f"127.0.0.1:{free_port()}", "--port", str(free_port())),
        *("--data-dir", str(tmp_path), "--artifact-store", location, "--s3-endpoint", endpoint),
    ]
    result = subprocess.run(argv, env=aws_env(**keys), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert fragment in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_hydro_up_refuses_a_missing_bucket_before_starting_anything(s3: SeaweedS3, tmp_path: Path) -> None:
    argv = [
        *(sys.executable, "-m", "manager_api.cli", "up", "--data-dir", str(tmp_path)),
        *("--artifact-store", "s3://no-such-bucket/models", "--s3-endpoint", s3.endpoint),
        *("--etcd-port", "0", "--api-port", "0", "--xds-port", "0", "--ingress-port", "0", "--xds-metrics-port", "0"),
    ]
    env = aws_env(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, COLUMNS="200")
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "bucket 'no-such-bucket' does not exist" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert not list(tmp_path.iterdir()), "hydro up started something before checking the artifact store"


def test_a_bucket_that_goes_away_after_startup_is_a_503_naming_the_store_with_retry_after(
    etcd_server: EtcdServer, tmp_path: Path
) -> None:
    with SeaweedS3(tmp_path / "s3") as s3:
        (tmp_path / "manager").mkdir()
        env = aws_env(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
        argv = ["--artifact-store", f"s3://{s3.bucket}/gone", "--s3-endpoint", s3.endpoint]
        process, url = start_manager(etcd_server, "/hydro-s3-gone-test/", tmp_path / "manager", argv, env)
    try:
        response = upload(url, "orphan", archive(9))
        assert response.status_code == 503, response.text
        assert f"artifact store s3://{s3.bucket}/gone/: HeadObject failed" in response.json()["error"]
        # Like etcd's 503: nothing was written, and a retry may succeed once the store is back.
        assert response.headers.get("retry-after") == "1", response.headers
        download = httpx.get(f"{url}/api/v1/artifacts/{digest_of(archive(9))}", timeout=60)
        assert download.status_code == 503, download.text
        assert download.headers.get("retry-after") == "1", download.headers
        # Nothing was registered for the refused upload.
        assert httpx.get(f"{url}/api/v1/models/orphan", timeout=30).status_code == 404
    finally:
        process.stop()
