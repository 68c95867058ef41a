"""Registering a model folder by its path on the manager's machine: only under --allow-register-from folders.

A real manager process on the session etcd; the folders are this test's temporary files.
"""

from __future__ import annotations

from collections.abc import Iterator
from hashlib import sha256
from pathlib import Path

import httpx
import pytest
from manager_under_test import MODEL_PY, SERVING_YAML, ManagerUnderTest

from manager_api.client import pack_model_to_file
from manager_api.etcd_server import EtcdServer


def _model_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "serving.yaml").write_bytes(SERVING_YAML)
    (folder / "model.py").write_bytes(MODEL_PY)
    return folder


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(allowed root with a model folder in it, a folder outside it with another model folder)."""
    base = tmp_path_factory.mktemp("register-from")
    allowed, outside = base / "models", base / "elsewhere"
    _model_folder(allowed / "doubler")
    _model_folder(outside / "secret")
    (allowed / "not-a-model").mkdir()
    # A link inside the allowed folder to a model folder outside it: following it would escape.
    (allowed / "escape").symlink_to(outside / "secret")
    # A model folder whose one file links to a file outside: packing it would copy that file into an artifact
    # that any token may then download (GET /artifacts/{digest}).
    leaky = _model_folder(allowed / "leaky")
    (outside / "password.txt").write_text("hunter2\n")
    (leaky / "notes.txt").symlink_to(outside / "password.txt")
    # A link to itself: resolving it never ends.
    (allowed / "loop").symlink_to(allowed / "loop")
    # Links that stay inside the allowed folder are fine.
    shared = _model_folder(allowed / "shared-weights")
    (allowed / "weights.bin").write_bytes(b"w")
    (shared / "weights.bin").symlink_to(allowed / "weights.bin")
    return allowed, outside


@pytest.fixture(scope="module")
def api(
    etcd_server: EtcdServer, roots: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    data_dir = tmp_path_factory.mktemp("manager")
    extra = ("--allow-register-from", str(roots[0]))
    with ManagerUnderTest(etcd_server.endpoint, "/hydro-from-path/", data_dir, extra_args=extra) as manager:
        with httpx.Client(base_url=manager.api, timeout=60) as client:
            yield client


def test_a_folder_under_an_allowed_root_becomes_the_next_version(api: httpx.Client, roots: tuple[Path, Path]) -> None:
    folder = roots[0] / "doubler"
    first = api.post("/models/doubler/versions/from-path", json={"path": str(folder)})
    assert first.status_code == 201, first.text
    assert first.json()["version"] == 1 and first.json()["runtime"] == "python"
    # Packed the way `hydro model push` packs: the same folder has the same digest either way.
    packed = pack_model_to_file(folder, roots[0].parent / "pushed.tar.gz")
    assert (
        first.json()["artifact"]["digest"] == packed.digest == f"sha256:{sha256(packed.path.read_bytes()).hexdigest()}"
    )
    assert api.post("/models/doubler/versions/from-path", json={"path": str(folder)}).json()["version"] == 2
    signature = api.get("/models/doubler/versions/2/signature")
    assert signature.json() == {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}],
    }


@pytest.mark.parametrize(
    ("where", "status", "fragment"),
    [
        ("outside", 403, "outside the folders the manager may read models from"),
        ("escape", 403, "outside the folders"),
        ("dotdot", 403, "outside the folders"),
        ("missing", 400, "is not a folder on the manager's machine"),
        ("not-a-model", 400, "has no serving.yaml"),
        ("leaky", 403, "notes.txt links to"),
        ("loop", 400, "cannot be resolved"),
        ("nul", 400, "cannot be resolved"),
    ],
)
def test_paths_that_are_not_allowed_model_folders_are_refused(
    api: httpx.Client, roots: tuple[Path, Path], where: str, status: int, fragment: str
) -> None:
    allowed, outside = roots
    path = {
        "outside": outside / "secret",
        "escape": allowed / "escape",
        "dotdot": allowed / ".." / "elsewhere" / "secret",
        "missing": allowed / "nothing-here",
        "not-a-model": allowed / "not-a-model",
        "leaky": allowed / "leaky",
        "loop": allowed / "loop",
        "nul": f"{allowed}/doubler\x00",
    }[where]
    response = api.post("/models/refused/versions/from-path", json={"path": str(path)})
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]
    assert api.get("/models/refused").status_code == 404


def test_links_that_stay_under_the_allowed_folder_are_followed(api: httpx.Client, roots: tuple[Path, Path]) -> None:
    response = api.post("/models/shared/versions/from-path", json={"path": str(roots[0] / "shared-weights")})
    assert response.status_code == 201, response.text
    assert "weights.bin" in response.json()["artifact"]["files"]


def test_bad_bodies_and_unknown_versions(api: httpx.Client) -> None:
    # Each refusal names the offending field (docs/manager_api.md: the message names what is wrong).
    for body, fragment in (
        ({}, "body.path: Field required"),
        ({"path": ""}, "body.path: String should have at least 1 character"),
        ({"path": "/tmp", "extra": 1}, "body.extra: Extra inputs are not permitted"),
    ):
        refused = api.post("/models/x/versions/from-path", json=body)
        assert refused.status_code == 422, refused.text
        assert fragment in refused.json()["error"], refused.text
    assert api.get("/models/x").status_code == 404, "nothing was registered by the refused calls"
    missing = api.get("/models/nothing/versions/1/signature")
    assert missing.status_code == 404 and "nothing:1" in missing.json()["error"]


def test_off_unless_the_manager_allows_a_folder(
    etcd_server: EtcdServer, roots: tuple[Path, Path], tmp_path: Path
) -> None:
    with ManagerUnderTest(etcd_server.endpoint, "/hydro-from-path-off/", tmp_path) as manager:
        response = httpx.post(
            f"{manager.api}/models/doubler/versions/from-path", json={"path": str(roots[0] / "doubler")}, timeout=30
        )
    assert response.status_code == 403
    assert "--allow-register-from" in response.json()["error"]
