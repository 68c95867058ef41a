"""Issue 5, acceptance 4: a manager SIGKILLed in the middle of a stream of writes loses no acknowledged write.

A real manager process on the session's real etcd takes deployment, application and model writes from four
threads; it is killed with SIGKILL midway and started again on the same port, and the threads carry on. Then:
every write acknowledged with a 2xx is what etcd holds (unless a later, unacknowledged write of the same key
may have landed), and nothing is half-written: every value parses, and each model version was written
together with its version counter.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from manager_under_test import ManagerUnderTest, etcd_prefix_items, python_model_archive, register_model

from manager_api.etcd_server import EtcdServer
from manager_api.processes import wait_until
from protos.topology.applications import Application
from protos.topology.deployments import Deployment
from protos.topology.keys import Keys
from protos.topology.models import ModelVersion

THREADS = 4
WRITES_PER_THREAD = 50
#: The kill comes once this many writes were acknowledged (of THREADS * WRITES_PER_THREAD).
KILL_AFTER_ACKS = 90

#: What a key holds: ("deployment", replicas, timeout_ms), ("application", weight of version 1), or None (absent).
State = tuple[Any, ...] | None


@dataclass
class Write:
    key: str
    path: str
    state: State
    acked: bool
    revision: int | None = None
    detail: str = ""


@pytest.fixture
def manager(etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path) -> Iterator[ManagerUnderTest]:
    with ManagerUnderTest(etcd_server.endpoint, etcd_prefix, tmp_path) as manager:
        yield manager


def _plan(keys: Keys, thread: int, index: int) -> tuple[str, str, dict[str, Any] | None, State]:
    """Write ``index`` of ``thread``: (method, path, body, what the key should hold after it)."""
    model = f"dur{thread}"
    app = f"dur{thread}-app{index % 3}"
    if index % 10 == 9:
        return "UPLOAD", model, None, None
    if index % 10 == 4:
        return "DELETE", f"/applications/{app}", None, None
    if index % 2 == 0:
        body = {"replicas": index, "policies": {"timeout_ms": 1000 + index}}
        return "PUT", f"/deployments/{model}/1", body, ("deployment", index, 1000 + index)
    variants = [{"model": model, "version": 1, "weight": index}, {"model": model, "version": 2, "weight": 100 - index}]
    return "PUT", f"/applications/{app}", {"stages": [{"variants": variants}]}, ("application", index)


def _key_of(keys: Keys, path: str) -> str:
    parts = path.strip("/").split("/")
    if parts[0] == "deployments":
        return keys.deployment(parts[1], int(parts[2]))
    return keys.application(parts[1])


def _writer(
    manager: ManagerUnderTest, keys: Keys, thread: int, log: list[Write], acks: list[int], lock: threading.Lock
) -> None:
    with httpx.Client(base_url=manager.api, timeout=30) as http:
        for index in range(WRITES_PER_THREAD):
            method, target, body, state = _plan(keys, thread, index)
            try:
                if method == "UPLOAD":
                    files = {"archive": ("model.tar.gz", python_model_archive())}
                    response = http.post(f"/models/{target}/versions", files=files)
                    detail = f"{response.status_code} {response.text}"
                    if response.status_code != 201:
                        write = Write(f"upload:{target}", "", ("version", None), False, detail=detail)
                    else:
                        version = response.json()
                        state = ("version", version["version"])
                        write = Write(f"upload:{target}", "", state, True, version["revision"], detail)
                else:
                    response = http.request(method, target, json=body)
                    ok = response.is_success
                    revision = response.json().get("revision") if response.status_code == 200 else None
                    detail = f"{response.status_code} {response.text}"
                    write = Write(_key_of(keys, target), target, state, ok, revision, detail)
            except httpx.TransportError as exc:
                # Cut off by the kill or refused while down: not acknowledged, outcome unknown.
                if method == "UPLOAD":
                    write = Write(f"upload:{target}", "", ("version", None), False, detail=repr(exc))
                else:
                    write = Write(_key_of(keys, target), target, state, False, detail=repr(exc))
                wait_until(manager.healthy, 90, "the manager back after the kill", interval=0.1)
            log.append(write)
            if write.acked:
                with lock:
                    acks[0] += 1


def test_acknowledged_writes_survive_a_sigkill(manager: ManagerUnderTest, etcd_server: EtcdServer) -> None:
    keys = Keys(manager.prefix)
    with httpx.Client(base_url=manager.api, timeout=30) as http:
        for number in range(THREADS):
            register_model(http, f"dur{number}")
            register_model(http, f"dur{number}")

    logs: list[list[Write]] = [[] for _ in range(THREADS)]
    acks = [0]
    lock = threading.Lock()
    threads = [
        threading.Thread(target=_writer, args=(manager, keys, t, logs[t], acks, lock), daemon=True)
        for t in range(THREADS)
    ]
    for thread in threads:
        thread.start()
    wait_until(lambda: acks[0] >= KILL_AFTER_ACKS, 120, f"{KILL_AFTER_ACKS} acknowledged writes")
    acked_before_kill = acks[0]
    manager.kill()
    killed_at = time.monotonic()
    manager.start()
    restart_seconds = time.monotonic() - killed_at
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a writer is stuck"

    writes = [w for log in logs for w in log]
    assert len(writes) == THREADS * WRITES_PER_THREAD
    failed = [w for w in writes if not w.acked]
    unexpected = [w.detail for w in failed if w.detail[:1] in "45"]
    assert not unexpected, unexpected  # only transport failures (the kill) may fail, never a refusal
    assert failed, "the kill cut no write: it came too late to test anything"
    assert acks[0] > acked_before_kill, "no write was acknowledged after the restart"
    kinds = sorted({w.detail.split("(")[0] for w in failed})
    print(f"{len(writes)} writes, {len(failed)} unacknowledged {kinds}, manager back after {restart_seconds:.1f} s")

    held = etcd_prefix_items(manager.etcd_endpoint, manager.prefix)
    _check_records(manager, logs, held)
    _check_model_versions(manager, keys, logs, held)


def _state_in_etcd(key: str, held: dict[str, tuple[bytes, int]]) -> State:
    if key not in held:
        return None
    value = held[key][0]
    if "/deployments/" in key:
        deployment = Deployment.model_validate_json(value)
        return ("deployment", deployment.replicas, deployment.policies.timeout_ms)
    application = Application.model_validate_json(value)
    return ("application", application.stages[0].variants[0].weight)


def _state_in_api(http: httpx.Client, path: str) -> tuple[State, int | None]:
    response = http.get(path)
    if response.status_code == 404:
        return None, None
    body = response.json()
    if path.startswith("/deployments/"):
        return ("deployment", body["replicas"], body["policies"]["timeout_ms"]), body["revision"]
    return ("application", body["stages"][0]["variants"][0]["weight"]), body["revision"]


def _check_records(manager: ManagerUnderTest, logs: list[list[Write]], held: dict[str, tuple[bytes, int]]) -> None:
    by_key: dict[str, list[Write]] = {}
    for log in logs:
        for write in log:
            if not write.key.startswith("upload:"):
                by_key.setdefault(write.key, []).append(write)
    for key, history in by_key.items():
        last_ack = max((i for i, w in enumerate(history) if w.acked), default=-1)
        later = history[last_ack + 1 :]  # all unacknowledged: the key may hold any of them
        allowed = [history[last_ack].state if last_ack >= 0 else None, *(w.state for w in later)]
        now = _state_in_etcd(key, held)
        assert now in allowed, f"{key} holds {now}, acknowledged {allowed[0]}, unacknowledged since {allowed[1:]}"
        if not later and last_ack >= 0 and history[last_ack].revision is not None:
            assert held[key][1] == history[last_ack].revision, f"{key} was written again after its last ack"
        with httpx.Client(base_url=manager.api, timeout=30) as http:
            assert _state_in_api(http, history[0].path) == (now, held[key][1] if key in held else None), key


def _check_model_versions(
    manager: ManagerUnderTest, keys: Keys, logs: list[list[Write]], held: dict[str, tuple[bytes, int]]
) -> None:
    blobs = manager.data_dir / "artifacts" / "blobs" / "sha256"
    with httpx.Client(base_url=manager.api, timeout=30) as http:
        for thread in range(THREADS):
            model = f"dur{thread}"
            stored = sorted(int(k.rsplit("/", 1)[1]) for k in held if k.startswith(keys.model_versions(model)))
            # The version key and the counter are one transaction: the counter is exactly the highest number.
            assert int(held[keys.version_counter(model)][0]) == max(stored), (model, stored)
            for number in stored:
                record = ModelVersion.model_validate_json(held[keys.model_version(model, number)][0])
                assert (blobs / record.artifact.digest.split(":")[1]).is_file()
                assert http.get(f"/models/{model}/versions/{number}").status_code == 200
            for write in logs[thread]:
                if write.acked and write.key.startswith("upload:"):
                    assert write.state is not None and write.state[1] in stored, (model, write.state, stored)
                    assert held[keys.model_version(model, write.state[1])][1] == write.revision
