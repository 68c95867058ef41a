"""With etcd down, the manager answers every API call 503 {"error": ...} naming etcd (docs/manager_api.md).

A real etcd of this test's own (the session's is shared) and a real manager; etcd is stopped under the manager,
or frozen (SIGSTOP: it holds its connections and answers nothing, like a host cut off by the network).
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from manager_under_test import ManagerUnderTest, python_model_archive

from manager_api.artifacts.local import LocalBlobs
from manager_api.etcd_server import EtcdServer


@pytest.fixture
def etcd_then_down(tmp_path: Path) -> Iterator[EtcdServer]:
    """An etcd the test may stop; stopped in any case at the end."""
    server = EtcdServer(tmp_path / "own-etcd").start()
    try:
        yield server
    finally:
        server.stop()


def test_every_call_is_a_503_naming_etcd_while_it_is_down(etcd_then_down: EtcdServer, tmp_path: Path) -> None:
    with (
        ManagerUnderTest(etcd_then_down.endpoint, "/hydro-down/", tmp_path / "manager") as manager,
        httpx.Client(base_url=manager.api, timeout=30) as http,
    ):
        assert http.get("/models").status_code == 200
        etcd_then_down.stop()
        calls = [
            http.get("/models"),
            http.get("/deployments/iris/1"),
            http.get("/applications"),
            http.put("/deployments/iris/1", json={"replicas": 1}),
            http.put("/applications/a", json={"stages": [{"variants": [{"model": "m", "version": 1, "weight": 100}]}]}),
            http.delete("/deployments/iris/1"),
            http.delete("/applications/a"),
        ]
        for response in calls:
            where = f"{response.request.method} {response.request.url.path}"
            assert response.status_code == 503, (where, response.text)
            assert response.json()["error"].startswith("etcd is unavailable"), (where, response.text)
            # Clients and proxies retry a 503 that says when.
            assert response.headers["retry-after"] == "1", where
        assert http.get(manager.url + "/healthz").status_code == 503


def test_an_upload_refused_for_etcd_keeps_its_checked_archive_as_the_docs_say(
    etcd_then_down: EtcdServer, tmp_path: Path
) -> None:
    """The archive is stored before etcd is asked: it stays (docs/manager_api.md says why it is not removed)."""
    data = python_model_archive()
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    with (
        ManagerUnderTest(etcd_then_down.endpoint, "/hydro-down-upload/", tmp_path / "manager") as manager,
        httpx.Client(base_url=manager.api, timeout=60) as http,
    ):
        etcd_then_down.stop()
        response = http.post("/models/m/versions", files={"archive": ("model.tar.gz", data)})
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
        assert LocalBlobs(tmp_path / "manager" / "artifacts").has(digest)
    docs = (Path(__file__).parents[2] / "docs" / "manager_api.md").read_text()
    assert "A refused upload leaves no key and no file." not in docs
    assert "an upload refused with a 503 for etcd leaves its archive" in " ".join(docs.split())


#: The manager's default deadline of an etcd read (``--etcd-timeout``), in seconds.
DEFAULT_ETCD_TIMEOUT = 5.0


def test_a_call_is_a_503_within_the_etcd_deadline_while_etcd_does_not_answer(
    etcd_then_down: EtcdServer, tmp_path: Path
) -> None:
    with (
        ManagerUnderTest(etcd_then_down.endpoint, "/hydro-frozen/", tmp_path / "manager") as manager,
        httpx.Client(base_url=manager.api, timeout=60) as http,
    ):
        assert http.get("/models").status_code == 200
        etcd_pid = etcd_then_down.process.pid
        assert etcd_pid is not None
        os.kill(etcd_pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            response = http.get("/models")
            waited = time.monotonic() - started
        finally:
            os.kill(etcd_pid, signal.SIGCONT)
        assert response.status_code == 503, response.text
        assert response.json()["error"].startswith("etcd is unavailable"), response.text
        assert DEFAULT_ETCD_TIMEOUT - 0.5 < waited < DEFAULT_ETCD_TIMEOUT + 5, waited
        # etcd answers again: so does the manager.
        assert http.get("/models").status_code == 200
