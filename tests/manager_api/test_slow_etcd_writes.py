"""etcd that stops answering in the middle of a write (a disk that stalls on fsync; reads were fine a moment ago):
every write is a 503 within about ``--etcd-timeout``, none waits for ever behind another, and once etcd answers
again so does the manager.

In process (the app served by uvicorn in a thread, requests over HTTP) against an etcd of the test's own, frozen
with SIGSTOP by the manager's own etcd client as it sends its first transaction: the one moment a test cannot catch
from outside.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from manager_under_test import python_model_archive, served

from manager_api.app import create_app
from manager_api.etcd_server import EtcdServer
from manager_api.settings import Settings

ETCD_TIMEOUT = 1.0


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path / "own-etcd").start()
    try:
        yield server
    finally:
        if server.process.pid is not None:
            os.kill(server.process.pid, signal.SIGCONT)
        server.stop()


def _settings(etcd: EtcdServer, tmp_path: Path) -> Settings:
    """The manager's settings against ``etcd``, with the short etcd deadline these tests wait out."""
    host, port = etcd.endpoint.rsplit(":", 1)
    return Settings(
        etcd_host=host, etcd_port=int(port), etcd_timeout=ETCD_TIMEOUT, prefix="/stall/", data_dir=tmp_path / "mgr"
    )


class FreezingKV:
    """etcd's KV stub that freezes etcd (SIGSTOP) just before sending the first transaction through it."""

    def __init__(self, stub: Any, etcd_pid: int) -> None:
        self._stub = stub
        self._etcd_pid = etcd_pid
        self.frozen = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)

    def Txn(self, request: Any, **kwargs: Any) -> Any:  # the name of the gRPC method it stands in for
        if not self.frozen:
            self.frozen = True
            os.kill(self._etcd_pid, signal.SIGSTOP)
        return self._stub.Txn(request, **kwargs)


def test_writes_are_503s_within_the_deadline_when_etcd_stalls_mid_write(own_etcd: EtcdServer, tmp_path: Path) -> None:
    app = create_app(_settings(own_etcd, tmp_path))
    etcd_pid = own_etcd.process.pid
    assert etcd_pid is not None
    with served(app) as http:
        registered = http.post("/api/v1/models/m/versions", files={"archive": ("m.tar.gz", python_model_archive())})
        assert registered.status_code == 201, registered.text
        store = app.state.store  # type: ignore[attr-defined]
        kv = FreezingKV(store.client.kvstub, etcd_pid)
        store.client.kvstub = kv

        def scale(replicas: int) -> tuple[int, str, str | None, float]:
            started = time.monotonic()
            response = http.put("/api/v1/deployments/m/1", json={"replicas": replicas})
            waited = time.monotonic() - started
            return response.status_code, response.text, response.headers.get("retry-after"), waited

        started = time.monotonic()
        try:
            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(scale, range(1, 5)))
        finally:
            os.kill(etcd_pid, signal.SIGCONT)
        everything = time.monotonic() - started
        assert kv.frozen
        for status, text, retry_after, waited in answers:
            assert status == 503, text
            assert retry_after == "1", text
            print(f"503 after {waited:.1f} s: {text}", file=sys.stderr)
        # Before: the frozen transaction waited 30 s, and each write queued behind it waited that long plus its
        # own read; now each is bounded by the etcd deadline, the queue included.
        assert everything < 4 * ETCD_TIMEOUT, answers
        # etcd answers again: so do writes (nothing stayed locked).
        response = http.put("/api/v1/deployments/m/1", json={"replicas": 2})
        assert response.status_code == 200, response.text


def test_an_event_stream_etcd_does_not_open_is_a_503_saying_why(own_etcd: EtcdServer, tmp_path: Path) -> None:
    app = create_app(_settings(own_etcd, tmp_path))
    etcd_pid = own_etcd.process.pid
    assert etcd_pid is not None
    with served(app) as http:
        os.kill(etcd_pid, signal.SIGSTOP)
        try:
            response = http.get("/api/v1/events")
        finally:
            os.kill(etcd_pid, signal.SIGCONT)
        assert response.status_code == 503, response.text
        # Before: "etcd is unavailable: " and nothing after it (aetcd's WatchTimeoutError has no message).
        assert response.json()["error"] == "etcd is unavailable: it did not open a watch in time", response.text
