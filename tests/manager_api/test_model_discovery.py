"""`hydro up --models-dir`: the watcher against a real manager process (admin token) and the session's real etcd.

Folders are copies of examples/iris trained here. The watcher runs in a thread with a short quiet period; tests
wait on the manager's answers with deadlines. The debounce test drives ``scan(now=...)`` itself, so "the files
were still being written when the watcher looked" is exact rather than a race against the clock.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from manager_api.auth import write_token_file
from manager_api.client import ApiError, ManagerClient, pack_model_folder
from manager_api.demo import EXAMPLES, ensure_trained
from manager_api.etcd_server import EtcdServer
from manager_api.model_discovery import Action, ModelDiscovery
from manager_api.ports import free_port
from manager_api.processes import ChildProcess, http_ok, wait_until

ADMIN = "discovery-admin-token"
#: Registration loads the model in a child process to check its signature: seconds, not milliseconds.
REGISTERED_WITHIN = 60.0


@pytest.fixture(scope="module")
def iris(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained copy of examples/iris (the repository's own folder is left untouched)."""
    folder = tmp_path_factory.mktemp("iris-source") / "iris"
    folder.mkdir()
    shutil.copy(EXAMPLES / "iris" / "serving.yaml", folder)
    shutil.copy(EXAMPLES / "iris" / "train.py", folder)
    ensure_trained(folder)
    (folder / "train.py").unlink()
    return folder


@pytest.fixture(scope="module")
def manager_url(etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data_dir = tmp_path_factory.mktemp("manager-discovery")
    tokens = data_dir / "tokens.json"
    write_token_file(tokens, {"watcher": ("admin", ADMIN)})
    port = free_port()
    process = ChildProcess(
        "manager_api",
        [
            *(sys.executable, "-m", "manager_api", "--etcd", etcd_server.endpoint, "--prefix", "/hydro-discovery/"),
            *("--data-dir", str(data_dir), "--port", str(port), "--tokens", str(tokens)),
        ],
        log_path=data_dir / "manager.log",
    ).start()
    try:
        url = f"http://127.0.0.1:{port}"
        process.wait_ready(lambda: http_ok(f"{url}/healthz"), 60)
        yield url
    finally:
        process.stop()


@pytest.fixture
def api(manager_url: str) -> Iterator[ManagerClient]:
    with ManagerClient(manager_url, ADMIN) as client:
        yield client


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    return folder


@pytest.fixture
def watcher(models_dir: Path, manager_url: str) -> Iterator[ModelDiscovery]:
    client = ManagerClient(manager_url, ADMIN)
    discovery = ModelDiscovery(models_dir, client, quiet_period=0.5, poll_interval=0.1).start()
    try:
        yield discovery
    finally:
        discovery.stop()
        client.close()


def versions(api: ManagerClient, model: str) -> list[int]:
    try:
        return [int(v["version"]) for v in api.get_model(model)["versions"]]
    except ApiError as exc:
        if exc.status == 404:
            return []
        raise


def digest_of(folder: Path) -> str:
    return "sha256:" + hashlib.sha256(pack_model_folder(folder)).hexdigest()


def wait_for_versions(api: ManagerClient, model: str, expected: list[int]) -> None:
    wait_until(lambda: versions(api, model) == expected, REGISTERED_WITHIN, f"{model} versions {expected}", 0.2)


def wait_for_next_handling(watcher: ModelDiscovery, folder: str, handled_before: int) -> None:
    def handled() -> bool:
        status = watcher.status.get(folder)
        return status is not None and status.handled > handled_before

    wait_until(handled, REGISTERED_WITHIN, f"the watcher handling {folder} again", 0.1)


def test_new_folder_is_version_1_a_touch_changes_nothing_an_edit_is_version_2(
    iris: Path, models_dir: Path, watcher: ModelDiscovery, api: ManagerClient
) -> None:
    folder = models_dir / "iris-a"
    shutil.copytree(iris, folder)
    wait_for_versions(api, "iris-a", [1])
    first = api.get_model("iris-a")["versions"][0]
    assert first["runtime"] == "sklearn"
    assert first["artifact"]["digest"] == digest_of(folder)
    assert watcher.status["iris-a"].action == Action.registered and watcher.status["iris-a"].version == 1

    # Touching every file changes the mtimes the watcher polls, not the content: it looks again, registers nothing.
    handled = watcher.status["iris-a"].handled
    for path in folder.iterdir():
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    wait_for_next_handling(watcher, "iris-a", handled)
    assert watcher.status["iris-a"].action == Action.unchanged
    assert versions(api, "iris-a") == [1]

    serving = folder / "serving.yaml"
    serving.write_text(serving.read_text() + "labels: {stage: second}\n")
    wait_for_versions(api, "iris-a", [1, 2])
    second = api.get_model("iris-a")["versions"][1]
    assert second["labels"] == {"stage": "second"}
    assert second["artifact"]["digest"] == digest_of(folder) != first["artifact"]["digest"]


def test_a_broken_folder_is_logged_left_alone_until_it_changes_and_others_still_register(
    iris: Path, models_dir: Path, watcher: ModelDiscovery, api: ManagerClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="manager_api.model_discovery")
    broken = models_dir / "broken-b"
    shutil.copytree(iris, broken)
    good_yaml = (broken / "serving.yaml").read_text()
    (broken / "serving.yaml").write_text(good_yaml.replace("runtime: sklearn", "runtime: cobol"))
    badly_named = models_dir / "Not A Model Name"
    shutil.copytree(iris, badly_named)
    shutil.copytree(iris, models_dir / "iris-b")
    named = models_dir / "folder-with-a-name"
    shutil.copytree(iris, named)
    (named / "serving.yaml").write_text("name: renamed-b\n" + good_yaml)
    same_name = models_dir / "zz-copy-of-the-named-folder"
    shutil.copytree(named, same_name)

    wait_for_versions(api, "iris-b", [1])
    wait_for_versions(api, "renamed-b", [1])
    wait_until(lambda: watcher.status["broken-b"].action == Action.failed, REGISTERED_WITHIN, "broken-b refused")
    status = watcher.status["broken-b"]
    assert status.error is not None and "unknown runtime 'cobol'" in status.error
    assert versions(api, "broken-b") == []
    assert watcher.status["Not A Model Name"].action == Action.failed
    assert "is not a valid model name" in (watcher.status["Not A Model Name"].error or "")
    wait_until(lambda: watcher.status[same_name.name].handled == 1, REGISTERED_WITHIN, "the copy handled")
    assert watcher.status[same_name.name].action == Action.failed
    assert "already comes from the folder 'folder-with-a-name'" in (watcher.status[same_name.name].error or "")
    assert versions(api, "renamed-b") == [1]
    logged = [r.getMessage() for r in caplog.records]
    assert any("broken-b" in m and "unknown runtime 'cobol'" in m for m in logged), logged

    # Left alone while unchanged: many scans later it was still handled once.
    scans = watcher.scans
    wait_until(lambda: watcher.scans >= scans + 10, 30, "ten more scans", 0.05)
    assert watcher.status["broken-b"].handled == status.handled

    (broken / "serving.yaml").write_text(good_yaml)
    wait_for_versions(api, "broken-b", [1])


def test_a_folder_still_being_written_is_not_registered_until_quiet(
    iris: Path, models_dir: Path, manager_url: str, api: ManagerClient
) -> None:
    model_file = (iris / "model.joblib").read_bytes()
    folder = models_dir / "iris-c"
    folder.mkdir()
    shutil.copy(iris / "serving.yaml", folder)
    partial = folder / "model.joblib"
    partial.write_bytes(model_file[: len(model_file) // 3])
    with ManagerClient(manager_url, ADMIN) as client:
        discovery = ModelDiscovery(models_dir, client, quiet_period=2.0)
        discovery.scan(now=100.0)
        with partial.open("ab") as out:
            out.write(model_file[len(model_file) // 3 : 2 * len(model_file) // 3])
        discovery.scan(now=101.5)
        discovery.scan(now=103.0)  # 1.5 s after the last change seen: still not quiet
        assert discovery.status["iris-c"].handled == 0
        with partial.open("ab") as out:
            out.write(model_file[2 * len(model_file) // 3 :])
        discovery.scan(now=103.4)
        assert discovery.status["iris-c"].handled == 0
        assert versions(api, "iris-c") == []
        discovery.scan(now=105.5)  # quiet for 2.1 s: registered, whole
        status = discovery.status["iris-c"]
        assert (status.action, status.version, status.handled) == (Action.registered, 1, 1), status.error
    assert versions(api, "iris-c") == [1]
    assert api.get_model("iris-c")["versions"][0]["artifact"]["digest"] == digest_of(folder)


def test_a_folder_with_a_file_linking_out_of_the_models_dir_is_skipped_with_one_log_line(
    iris: Path,
    models_dir: Path,
    tmp_path: Path,
    watcher: ModelDiscovery,
    api: ManagerClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Packing follows links and any token can download an artifact: a link out of the models dir would leak."""
    caplog.set_level(logging.INFO, logger="manager_api.model_discovery")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    secret = elsewhere / "secret"
    secret.write_text("hunter2\n")
    leaky = models_dir / "leaky-d"
    shutil.copytree(iris, leaky)
    (leaky / "notes.txt").symlink_to(secret)
    # The whole model folder a link to a folder outside: the same escape, as from-path refuses it.
    outside_model = elsewhere / "iris"
    shutil.copytree(iris, outside_model)
    (models_dir / "linked-d").symlink_to(outside_model)
    # A link that stays inside the models dir is followed, like from-path follows one under an allowed folder.
    (models_dir / "shared.txt").write_text("shared notes\n")
    inside = models_dir / "inside-d"
    shutil.copytree(iris, inside)
    (inside / "notes.txt").symlink_to(models_dir / "shared.txt")
    shutil.copytree(iris, models_dir / "iris-d")

    wait_for_versions(api, "iris-d", [1])
    wait_for_versions(api, "inside-d", [1])
    for name in ("leaky-d", "linked-d"):
        wait_until(lambda n=name: watcher.status[n].action == Action.failed, REGISTERED_WITHIN, f"{name} refused")
    assert versions(api, "leaky-d") == [] and versions(api, "linked-d") == []
    assert f"notes.txt links to {secret}" in (watcher.status["leaky-d"].error or "")
    assert f"the folder links to {outside_model}" in (watcher.status["linked-d"].error or "")
    logged = [r.getMessage() for r in caplog.records if "leaky-d" in r.getMessage()]
    assert len(logged) == 1 and f"notes.txt links to {secret}" in logged[0], logged

    # Left alone while unchanged (one log line, not one per scan); the watcher goes on with the others.
    scans = watcher.scans
    wait_until(lambda: watcher.scans >= scans + 10, 30, "ten more scans", 0.05)
    assert len([r for r in caplog.records if "leaky-d" in r.getMessage()]) == 1
    assert watcher.status["leaky-d"].handled == 1
