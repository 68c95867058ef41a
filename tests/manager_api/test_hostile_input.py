"""Input a careless or hostile client sends: each is a 4xx ``{"error": ...}`` naming what is wrong, never a 500,
a hang or a silently different write; nothing is left in etcd.

A real manager process on the session's real etcd, with a 1 MiB upload limit.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
import zipfile
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from manager_under_test import (
    MODEL_PY,
    SERVING_YAML,
    ManagerUnderTest,
    etcd_prefix_items,
    etcd_put,
    python_model_archive,
    raw_request,
    register_model,
    tar_gz,
)

from manager_api.etcd_server import EtcdServer

PREFIX = "/hydro-hostile-test/"


@pytest.fixture(scope="module")
def manager(etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagerUnderTest]:
    data_dir = tmp_path_factory.mktemp("mgr")
    with ManagerUnderTest(etcd_server.endpoint, PREFIX, data_dir, extra_args=("--max-upload-mb", "1")) as manager:
        with httpx.Client(base_url=manager.api, timeout=30) as http:
            register_model(http, "hostile")
        yield manager


@pytest.fixture
def http(manager: ManagerUnderTest) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=manager.api, timeout=30) as client:
        yield client


def keys(manager: ManagerUnderTest) -> dict[str, int]:
    return {key: revision for key, (_, revision) in etcd_prefix_items(manager.etcd_endpoint, PREFIX).items()}


def assert_error(response: httpx.Response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json", response.headers
    message = response.json()["error"]
    for fragment in fragments:
        assert fragment in message, message


APP = {"stages": [{"variants": [{"model": "hostile", "version": 1, "weight": 100}]}]}


def test_a_name_with_a_trailing_newline_is_refused(manager: ManagerUnderTest, http: httpx.Client) -> None:
    # Python's `$` matches before a final newline: "iris\n" passed the name check and became a key segment.
    before = keys(manager)
    upload = {"archive": ("m.tar.gz", python_model_archive())}
    assert_error(http.post("/models/hostile%0A/versions", files=upload), 400, "invalid model name")
    assert_error(http.put("/applications/app%0A", json=APP), 400, "invalid application name")
    assert_error(http.put("/deployments/hostile%0A/1", json={"replicas": 0}), 400, "invalid model name")
    assert keys(manager) == before


def truncated_tar_gz() -> bytes:
    return python_model_archive()[:100]


def truncated_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        data = b"x" * 4096
        info = tarfile.TarInfo("model.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()[:1024]


def truncated_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        bundle.writestr("serving.yaml", "runtime: python\n" * 100)
    return buffer.getvalue()[:200]


def corrupt_tar_xz() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for name, data in (
            ("serving.yaml", b"runtime: python\n"),
            ("weights.bin", random.Random(0).randbytes(200_000)),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    damaged = bytearray(buffer.getvalue())
    for index in range(len(damaged) // 2, len(damaged) // 2 + 64):
        damaged[index] ^= 0x55
    return bytes(damaged)


@pytest.mark.parametrize(
    "archive",
    [truncated_tar_gz(), truncated_tar(), truncated_zip(), corrupt_tar_xz()],
    ids=["tgz", "tar", "zip", "corrupt-xz"],
)
def test_a_truncated_archive_is_a_400(manager: ManagerUnderTest, http: httpx.Client, archive: bytes) -> None:
    before = keys(manager)
    response = http.post("/models/cut/versions", files={"archive": ("m.tar.gz", archive)})
    assert_error(response, 400, "archive")
    assert keys(manager) == before


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"replicas": "1"}, "body.replicas"),
        ({"replicas": True}, "body.replicas"),
        ({"replicas": 1.0}, "body.replicas"),
    ],
    ids=["string", "bool", "float"],
)
def test_replicas_must_be_a_json_integer(
    manager: ManagerUnderTest, http: httpx.Client, body: dict[str, Any], field: str
) -> None:
    # `true` became 1 replica and "1" one too: a count that is not a number is a mistake to show, not to guess.
    before = keys(manager)
    assert_error(http.put("/deployments/hostile/1", json=body), 422, field)
    assert keys(manager) == before


def test_pipeline_replicas_must_be_a_json_integer(manager: ManagerUnderTest, http: httpx.Client) -> None:
    before = keys(manager)
    assert_error(http.put("/applications/strict", json={**APP, "pipeline_replicas": "2"}), 422, "pipeline_replicas")
    assert keys(manager) == before


def test_a_duplicate_key_in_a_body_is_a_400_naming_it(manager: ManagerUnderTest, http: httpx.Client) -> None:
    # JSON parsers disagree on duplicates (first or last wins): the manager must not pick one silently.
    before = keys(manager)
    body = b'{"replicas": 1, "replicas": 0}'
    response = http.put("/deployments/hostile/1", content=body, headers={"content-type": "application/json"})
    assert_error(response, 400, "replicas", "twice")
    nested = json.dumps(APP)[:-1] + ', "pipeline_replicas": 1, "pipeline_replicas": 2}'
    response = http.put("/applications/dup", content=nested, headers={"content-type": "application/json"})
    assert_error(response, 400, "pipeline_replicas", "twice")
    assert keys(manager) == before


@pytest.mark.parametrize(
    ("method", "path", "declared"),
    [
        ("POST", "/api/v1/models/huge/versions", 1024**3),  # 1 GiB against a 1 MiB upload limit
        ("PUT", "/api/v1/deployments/hostile/1", 512 * 1024**2),  # no JSON body is anywhere near 512 MiB
    ],
    ids=["upload", "json"],
)
def test_a_body_declared_over_the_limit_is_a_413_before_it_is_read(
    manager: ManagerUnderTest, method: str, path: str, declared: int
) -> None:
    # Before: the manager read (and spooled to disk, or held in memory) the whole body first; here it would wait
    # for ever for the bytes the client never sends.
    content_type = "multipart/form-data; boundary=b" if method == "POST" else "application/json"
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {declared}\r\n"
        "Connection: close\r\n"
    )
    # The start of a well-formed body: the parser would go on waiting for the rest.
    start = b'--b\r\nContent-Disposition: form-data; name="archive"; filename="m.tar.gz"\r\n\r\n\x1f\x8b'
    status, payload = raw_request(manager.port, head, start if method == "POST" else b'{"replicas": ')
    assert status == 413, payload
    # The upload route's limit (--max-upload-mb) for the archive; the JSON limit for the deployment body.
    expected = "--max-upload-mb" if method == "POST" else "the request body is larger than the limit of"
    assert expected in json.loads(payload)["error"], payload


def test_an_upload_over_the_limit_is_a_413(manager: ManagerUnderTest, http: httpx.Client) -> None:
    before = keys(manager)
    big = {"archive": ("m.tar.gz", b"\0" * (2 * 1024**2))}
    assert_error(http.post("/models/big/versions", files=big), 413, "larger than the limit of", "--max-upload-mb")
    assert keys(manager) == before


def test_a_delete_with_revision_zero_says_what_it_found(manager: ManagerUnderTest, http: httpx.Client) -> None:
    # revision 0 means "absent": a DELETE sent with it finds the record, and must not talk of creating it.
    assert http.put("/deployments/hostile/1", json={"replicas": 0}).status_code == 200
    response = http.delete("/deployments/hostile/1", params={"revision": 0})
    assert_error(response, 409, "deployment hostile/1 exists", "read it again")
    assert "create" not in response.json()["error"]
    assert response.json()["current_revision"] > 0


def blobs(manager: ManagerUnderTest) -> list[str]:
    return sorted(p.name for p in (manager.data_dir / "artifacts" / "blobs" / "sha256").iterdir())


@pytest.mark.parametrize(
    ("name", "fragment"),
    [("caf\udce9.txt", "not UTF-8"), ("a\nb.txt", "control character"), ("tab\there", "control character")],
    ids=["latin-1", "newline", "tab"],
)
def test_an_archive_member_name_that_is_not_printable_utf8_is_a_400(
    manager: ManagerUnderTest, http: httpx.Client, name: str, fragment: str
) -> None:
    # A name in Latin-1 (a tar made on an old system) was a 500 UnicodeEncodeError after the archive was kept.
    before, stored = keys(manager), blobs(manager)
    archive = tar_gz({"serving.yaml": SERVING_YAML, "model.py": MODEL_PY, name: b"x"}, encoding="latin-1")
    response = http.post("/models/names/versions", files={"archive": ("m.tar", archive)})
    assert_error(response, 400, "archive member", fragment)
    assert keys(manager) == before
    assert blobs(manager) == stored


def test_a_model_version_too_big_for_etcd_is_a_400_and_keeps_nothing(
    manager: ManagerUnderTest, http: httpx.Client
) -> None:
    # 2 MB of labels compress to 2 KB: the upload is small, the record is more than etcd takes (a 500 before).
    before, stored = keys(manager), blobs(manager)
    serving = SERVING_YAML + b"labels: {notes: '" + b"a" * 2_000_000 + b"'}\n"
    response = http.post(
        "/models/big-record/versions",
        files={"archive": ("m.tar", tar_gz({"serving.yaml": serving, "model.py": MODEL_PY}))},
    )
    assert_error(response, 400, "labels", "etcd")
    assert keys(manager) == before
    assert blobs(manager) == stored


@pytest.mark.parametrize(
    "headers",
    [{"content-type": "application/x-www-form-urlencoded"}, {"content-type": "text/plain"}, {}],
    ids=["curl-d", "text", "none"],
)
def test_a_json_body_sent_as_something_else_is_a_415_saying_so(
    manager: ManagerUnderTest, http: httpx.Client, headers: dict[str, str]
) -> None:
    # `curl -X PUT -d '{"replicas": 1}'` sends a form content type: the answer was a 422 about "a valid dictionary"
    # quoting the bytes, which does not say the one thing to change.
    before = keys(manager)
    response = http.put("/deployments/hostile/1", content=b'{"replicas": 1}', headers=headers)
    assert_error(response, 415, "Content-Type: application/json")
    assert keys(manager) == before


def test_a_multipart_upload_cut_short_is_a_400_saying_so(manager: ManagerUnderTest, http: httpx.Client) -> None:
    # A body that ends before its closing boundary (a client or proxy that gave up half way) was a 422
    # "body.archive: Field required", as if the client had forgotten the field.
    before = keys(manager)
    part = b'--b\r\nContent-Disposition: form-data; name="archive"; filename="m.tar.gz"\r\n\r\n'
    headers = {"content-type": "multipart/form-data; boundary=b"}
    response = http.post("/models/cut/versions", content=part + python_model_archive(), headers=headers)
    assert_error(response, 400, "closing boundary")
    # The whole body, with an epilogue after the closing boundary (allowed by RFC 2046), is fine.
    whole = part + python_model_archive() + b"\r\n--b--\r\nepilogue"
    assert http.post("/models/cut/versions", content=whole, headers=headers).status_code == 201
    assert http.delete("/models/cut/versions/1").status_code == 204
    assert {k for k in keys(manager) if "/cut" not in k} == set(before)


@pytest.mark.parametrize(
    ("variant", "field"),
    [
        ({"model": "hostile", "version": 1, "weight": True}, "stages[0].variants[0].weight"),
        ({"model": "hostile", "version": "1", "weight": 100}, "stages[0].variants[0].version"),
        ({"model": "hostile", "version": 1.0, "weight": 100}, "stages[0].variants[0].version"),
    ],
    ids=["bool-weight", "string-version", "float-version"],
)
def test_variant_numbers_must_be_json_integers(
    manager: ManagerUnderTest, http: httpx.Client, variant: dict[str, Any], field: str
) -> None:
    before = keys(manager)
    assert_error(http.put("/applications/strict", json={"stages": [{"variants": [variant]}]}), 422, field)
    shadow = {"stages": [{"variants": [APP["stages"][0]["variants"][0]], "shadows": [{"model": "x", "version": "2"}]}]}
    assert_error(http.put("/applications/strict", json=shadow), 422, "stages[0].shadows[0].version")
    assert keys(manager) == before


def test_two_archives_in_one_upload_are_a_400(manager: ManagerUnderTest, http: httpx.Client) -> None:
    # FastAPI hands the route the last one: the first was dropped without a word (here the last is not even one).
    before = keys(manager)
    files = [("archive", ("a.tar.gz", python_model_archive())), ("archive", ("b.tar.gz", b"junk"))]
    assert_error(http.post("/models/twice/versions", files=files), 400, "2 files in the field archive")
    assert keys(manager) == before


def test_records_broken_by_hand_in_etcd_are_named_and_can_be_replaced(
    manager: ManagerUnderTest, http: httpx.Client
) -> None:
    # The state is meant to be read (and so also written) with etcdctl. A broken record was a 500 quoting a
    # pydantic error without its key, and a PUT could not replace it (the same 500): only etcdctl could.
    register_model(http, "broken")
    deployment, application = f"{PREFIX}deployments/broken/1", f"{PREFIX}applications/broken"
    body = {"stages": [{"variants": [{"model": "broken", "version": 1, "weight": 100}]}]}
    assert http.put("/applications/broken", json=body).status_code == 200
    etcd_put(manager.etcd_endpoint, deployment, b"{not json")
    etcd_put(manager.etcd_endpoint, application, b'{"schema_version": 1}')
    assert_error(http.get("/deployments/broken/1"), 500, deployment, "not a valid")
    assert_error(http.get("/applications/broken"), 500, application, "not a valid")
    # In use by a deployment, even one whose record is broken.
    assert_error(http.delete("/models/broken/versions/1"), 409, "deployment broken:1")
    assert http.put("/deployments/broken/1", json={"replicas": 0}).status_code == 200
    assert http.get("/deployments/broken/1").json()["replicas"] == 0
    assert http.put("/applications/broken", json=body).status_code == 200
    assert http.get("/applications/broken").status_code == 200
    etcd_put(manager.etcd_endpoint, f"{PREFIX}models/broken/1", b"garbage")
    assert_error(http.get("/models/broken/versions/1"), 500, f"{PREFIX}models/broken/1")
    # A version counter that is not a number does not stop the next upload.
    etcd_put(manager.etcd_endpoint, f"{PREFIX}version-counters/broken", b"garbage")
    assert register_model(http, "broken")["version"] == 2
