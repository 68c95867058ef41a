"""Shared fixtures: a real etcd per test session, per-test key prefixes, and a leak check.

Every process a test starts inherits HYDRO_TEST_SESSION; when the session ends, any process still carrying it
is a leak: it is killed and the session fails.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from manager_api.etcd_server import EtcdServer

SESSION_MARKER = f"HYDRO_TEST_SESSION={uuid.uuid4().hex}"
os.environ["HYDRO_TEST_SESSION"] = SESSION_MARKER.split("=", 1)[1]


def _leaked_processes() -> list[tuple[int, str]]:
    leaked = []
    marker = SESSION_MARKER.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                leaked.append((int(entry.name), cmdline[:200]))
        except OSError:
            continue
    return leaked


@pytest.fixture(scope="session", autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Fail the session if any process started by a test outlives it (and kill it)."""
    yield
    leaked = [(pid, cmd) for pid, cmd in _leaked_processes() if cmd.strip()]
    for pid, _ in leaked:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not leaked, f"processes left running after the tests: {leaked}"


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One real etcd for the whole session; tests isolate themselves with ``etcd_prefix``."""
    server = EtcdServer(tmp_path_factory.mktemp("etcd")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def etcd_prefix() -> str:
    """A key prefix of its own for each test, so tests sharing one etcd never see each other's keys."""
    return f"/hydro-test-{uuid.uuid4().hex[:8]}/"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path
