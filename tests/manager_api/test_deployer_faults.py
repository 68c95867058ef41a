"""The process deployer when a deployment or a replica cannot be started: the others go on, the failure is a
crash loop with its reason, and nothing it started is left running.

A real etcd and a real manager (`python -m manager_api --deployer process`) start real runtime + sidecar pairs.
No xds_control runs: the replicas stay ``starting`` (their sidecars get no configuration), which is enough to see
that the deployer took each deployment up.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from manager_under_test import ManagerUnderTest, etcd_prefix_items, python_model_archive

from manager_api.etcd_server import EtcdServer
from manager_api.ports import free_port
from manager_api.processes import wait_until


def model_archive(name: str) -> bytes:
    """A one-function python model whose archive (and digest) is its own: ``name`` is in its code."""
    return python_model_archive(f"# {name}\ndef predict(inputs):\n    return {{'y': inputs['x'] * 2}}\n".encode())


@pytest.fixture
def manager(etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path) -> Iterator[ManagerUnderTest]:
    # Nothing listens on the xDS port: sidecars start and wait, which keeps each replica "starting".
    extra = ("--deployer", "process", "--xds", f"127.0.0.1:{free_port()}")
    with ManagerUnderTest(etcd_server.endpoint, etcd_prefix, tmp_path, extra_args=extra) as running:
        yield running


def register(http: httpx.Client, name: str) -> dict[str, Any]:
    response = http.post(f"/models/{name}/versions", files={"archive": ("model.tar.gz", model_archive(name))})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def instances(http: httpx.Client, model: str) -> list[dict[str, Any]]:
    response = http.get(f"/deployments/{model}/1")
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["instances"]
    return found


def test_a_deployment_whose_archive_is_gone_does_not_stop_the_others(manager: ManagerUnderTest) -> None:
    with httpx.Client(base_url=manager.api, timeout=30) as http:
        broken = register(http, "aaa-lost")
        register(http, "good")
        # The archive is lost from the artifact store (a disk cleaned up, a bucket emptied): this version can no
        # longer be unpacked for a runtime. Its deployment sorts first, so the deployer meets it first.
        hexdigest = broken["artifact"]["digest"].removeprefix("sha256:")
        (manager.data_dir / "artifacts" / "blobs" / "sha256" / hexdigest).unlink()
        shutil.rmtree(manager.data_dir / "artifacts" / "folders" / "sha256" / hexdigest)
        try:
            assert http.put("/deployments/aaa-lost/1", json={"replicas": 1}).status_code == 200
            assert http.put("/deployments/good/1", json={"replicas": 1}).status_code == 200
            wait_until(lambda: len(instances(http, "good")) == 1, 30, "a replica of good")
            assert instances(http, "aaa-lost") == []
        finally:
            # Stop the replicas before the manager: a deleted deployment's replicas are killed at once.
            for model in ("good", "aaa-lost"):
                http.delete(f"/deployments/{model}/1")
            statuses = manager.prefix + "replicas/"
            wait_until(lambda: not etcd_prefix_items(manager.etcd_endpoint, statuses), 30, "replicas stopped")
        # The deployment that cannot start is named in the log, with why.
        log = (manager.data_dir / "manager.log").read_text()
        assert "aaa-lost:1" in log, log[-2000:]


def runtimes_of(model: str) -> list[int]:
    """The pids of live runtime processes serving ``model``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"runtimes" in argv and model.encode() in argv and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.fixture
def manager_without_envoy(
    etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ManagerUnderTest]:
    """A manager whose deployer is told of an Envoy binary that is not there (a typo in HYDRO_ENVOY_BIN)."""
    monkeypatch.setenv("HYDRO_ENVOY_BIN", str(tmp_path / "no-such-envoy"))
    extra = ("--deployer", "process", "--xds", f"127.0.0.1:{free_port()}")
    with ManagerUnderTest(etcd_server.endpoint, etcd_prefix, tmp_path, extra_args=extra) as running:
        yield running


def test_a_sidecar_that_cannot_be_started_is_a_crash_loop_with_no_runtime_left(
    manager_without_envoy: ManagerUnderTest,
) -> None:
    manager = manager_without_envoy
    model = f"solo-{uuid.uuid4().hex[:6]}"
    with httpx.Client(base_url=manager.api, timeout=30) as http:
        register(http, model)
        assert http.put(f"/deployments/{model}/1", json={"replicas": 1}).status_code == 200
        try:

            def crash_looping() -> bool:
                found = instances(http, model)
                return len(found) == 1 and found[0]["state"] == "crash-looping" and found[0]["restarts"] >= 1

            wait_until(crash_looping, 30, "a crash-looping replica that was restarted once")
            # Seen crash-looping, then no runtime, then the same crash (no restart in between): between its
            # attempts the replica runs nothing.
            for _ in range(20):
                before = instances(http, model)[0]
                running = runtimes_of(model)
                after = instances(http, model)[0]
                if before == after and after["state"] == "crash-looping":
                    break
            else:
                # Without one unchanged crash-looping reading around it, `running` was taken mid-attempt and
                # proves nothing either way.
                pytest.fail(f"no stable crash-looping state in 20 readings; last {before} then {after}")
            assert running == [], f"runtime processes left running: {running}"
            assert "no-such-envoy" in after["last_error"], after
            assert after["next_restart_at"] is not None, after
        finally:
            http.delete(f"/deployments/{model}/1")
            statuses = manager.prefix + "replicas/"
            wait_until(lambda: not etcd_prefix_items(manager.etcd_endpoint, statuses), 30, "replicas stopped")
