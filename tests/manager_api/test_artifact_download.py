"""``GET /api/v1/artifacts/{digest}`` and the agent's artifact cache that uses it, against a real manager.

A `hydro agent` on another host cannot read the manager's artifact store: it downloads the archive by digest
with a (viewer) token, checks it against the digest and unpacks it into its own cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from manager_under_test import MODEL_PY, SERVING_YAML, ManagerUnderTest

from manager_api.auth import write_token_file
from manager_api.client import ManagerClient
from manager_api.deployer.fetch import ArtifactFetchError, FetchedArtifacts
from manager_api.etcd_server import EtcdServer

ADMIN, VIEWER = "hydro_admin_token_for_tests", "hydro_viewer_token_for_tests"


@pytest.fixture(scope="module")
def manager_url(etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data_dir = tmp_path_factory.mktemp("manager")
    tokens = data_dir / "tokens.json"
    write_token_file(tokens, {"admin": ("admin", ADMIN), "viewer": ("viewer", VIEWER)})
    with ManagerUnderTest(etcd_server.endpoint, "/hydro-artifact-download-test/", data_dir, tokens) as manager:
        yield manager.url


@pytest.fixture(scope="module")
def digest(manager_url: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("model")
    (folder / "serving.yaml").write_bytes(SERVING_YAML)
    (folder / "model.py").write_bytes(MODEL_PY)
    with ManagerClient(manager_url, ADMIN) as api:
        return str(api.push_model("double", folder)["artifact"]["digest"])


def get(url: str, token: str | None = VIEWER) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.get(url, headers=headers, timeout=30)


def test_a_viewer_downloads_the_archive_and_it_hashes_to_its_digest(manager_url: str, digest: str) -> None:
    response = get(f"{manager_url}/api/v1/artifacts/{digest}")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    assert f"sha256:{hashlib.sha256(response.content).hexdigest()}" == digest


@pytest.mark.parametrize(
    ("bad", "status", "fragment"),
    [
        ("sha256:1234", 400, "invalid artifact digest"),
        ("md5:" + "0" * 64, 400, "invalid artifact digest"),
        ("sha256:" + "A" * 64, 400, "invalid artifact digest"),
        ("sha256:" + "0" * 64, 404, "not found"),
    ],
)
def test_a_bad_or_unknown_digest_is_a_json_error(manager_url: str, bad: str, status: int, fragment: str) -> None:
    response = get(f"{manager_url}/api/v1/artifacts/{bad}")
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]


def test_downloading_needs_a_token(manager_url: str, digest: str) -> None:
    assert get(f"{manager_url}/api/v1/artifacts/{digest}", token=None).status_code == 401
    assert get(f"{manager_url}/api/v1/artifacts/{digest}", token="hydro_wrong").status_code == 401


def test_the_agent_cache_fetches_once_and_unpacks_the_model_folder(
    manager_url: str, digest: str, tmp_path: Path
) -> None:
    cache = FetchedArtifacts(tmp_path, manager_url, VIEWER)
    folder = cache.materialize(digest)
    assert (folder / "serving.yaml").read_bytes() == SERVING_YAML
    assert (folder / "model.py").read_bytes() == MODEL_PY
    # Cached: a second call needs no manager (a bad URL would fail the download).
    assert FetchedArtifacts(tmp_path, "http://127.0.0.1:9", VIEWER).materialize(digest) == folder
    assert not list((tmp_path / "scratch").iterdir()), "the download's scratch folder was left behind"


def test_the_agent_cache_reports_a_refused_download_and_keeps_nothing(
    manager_url: str, digest: str, tmp_path: Path
) -> None:
    cache = FetchedArtifacts(tmp_path, manager_url, "hydro_wrong")
    with pytest.raises(ArtifactFetchError, match="HTTP 401"):
        cache.materialize(digest)
    with pytest.raises(ArtifactFetchError, match="HTTP 404"):
        FetchedArtifacts(tmp_path, manager_url, VIEWER).materialize("sha256:" + "0" * 64)
    assert not list((tmp_path / "folders" / "sha256").iterdir())
    assert not list((tmp_path / "scratch").iterdir())
