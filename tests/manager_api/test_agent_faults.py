"""A `hydro agent` when a deployment cannot start, and when its etcd stops answering.

A real etcd, a real manager (`python -m manager_api`, no deployer of its own, access log on) and a real agent
(`python -m manager_api.cli agent`). No xds_control runs: replicas stay ``starting`` (their sidecars get no
configuration), which is enough to see that the agent took a deployment up.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from hydro_mesh import descendants
from manager_under_test import ManagerUnderTest, etcd_prefix_items, python_model_archive

from manager_api.etcd_server import EtcdServer
from manager_api.ports import free_port
from manager_api.processes import ChildProcess, wait_until


@dataclass
class Agent:
    """One `hydro agent` process (node ``n1``) and where it logs."""

    process: ChildProcess
    log: Path


def start_agent(etcd: str, prefix: str, manager_url: str, root: Path, *extra: str) -> Agent:
    """`hydro agent` against ``etcd`` and the manager; started once its node record is in etcd."""
    argv = [sys.executable, "-m", "manager_api.cli", "agent", "--node", "n1", "--advertise-address", "127.0.0.1"]
    argv += ["--manager", manager_url, "--etcd", etcd, "--xds", f"127.0.0.1:{free_port()}", "--prefix", prefix]
    argv += ["--data-dir", str(root / "agent"), "--lease-ttl", "2", *extra]
    log = root / "agent.log"
    process = ChildProcess("agent-n1", argv, log_path=log).start()
    try:
        # Raises at once with the agent's log tail if it exits instead.
        process.wait_ready(lambda: bool(etcd_prefix_items(etcd, prefix + "nodes/")), 60)
    except BaseException:
        stop_agent(process)
        raise
    return Agent(process, log)


def stop_agent(process: ChildProcess) -> None:
    """Stop the agent, and whatever runtime or sidecar of it outlived it."""
    family = descendants(process.pid or 0) if process.running else set()
    process.stop(grace=30.0)
    for pid in family:
        if Path(f"/proc/{pid}").exists() and pid != os.getpid():
            os.kill(pid, signal.SIGKILL)


def register(http: httpx.Client, name: str) -> str:
    """Register a python model of its own archive; its digest."""
    code = f"# {name}\ndef predict(inputs):\n    return {{'y': inputs['x'] * 2}}\n".encode()
    response = http.post(f"/models/{name}/versions", files={"archive": ("model.tar.gz", python_model_archive(code))})
    assert response.status_code == 201, response.text
    return str(response.json()["artifact"]["digest"])


def statuses(etcd: str, prefix: str, model: str) -> list[str]:
    """The keys of ``model``'s replica statuses, read from etcd itself."""
    return [key for key in etcd_prefix_items(etcd, prefix + "replicas/") if f"/{model}/" in key]


def times_it_grew(count: Callable[[], int], times: int, timeout: float) -> list[float]:
    """When ``count()`` went up, polled until it did ``times`` times (monotonic seconds)."""
    seen: list[float] = []
    last = count()
    deadline = time.monotonic() + timeout
    while len(seen) < times and time.monotonic() < deadline:
        now = count()
        seen += [time.monotonic()] * (now - last)
        last = now
        time.sleep(0.05)
    assert len(seen) >= times, f"only {len(seen)} in {timeout} s"
    return seen


@pytest.fixture
def manager(etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path) -> Iterator[ManagerUnderTest]:
    # Access log on: each download attempt of an agent is a line in manager.log.
    with ManagerUnderTest(
        etcd_server.endpoint, etcd_prefix, tmp_path / "manager", extra_args=("--log-level", "info")
    ) as running:
        yield running


def test_a_deployment_whose_archive_is_gone_is_retried_with_back_off_and_starts_once_fixed(
    manager: ManagerUnderTest, tmp_path: Path
) -> None:
    model = f"lost-{uuid.uuid4().hex[:6]}"
    etcd, prefix = manager.etcd_endpoint, manager.prefix
    with httpx.Client(base_url=manager.api, timeout=30) as http:
        digest = register(http, model)
        # The archive is lost from the manager's store (a disk cleaned up): the agent's downloads get a 404.
        blob = manager.data_dir / "artifacts" / "blobs" / "sha256" / digest.removeprefix("sha256:")
        kept = tmp_path / "kept-archive"
        blob.rename(kept)
        agent = start_agent(etcd, prefix, manager.url, tmp_path)
        try:
            downloads = manager.data_dir / "manager.log"

            def attempts() -> int:
                lines = downloads.read_text(errors="replace").splitlines()
                return sum('"GET /api/v1/artifacts/' in line and digest[7:] in line for line in lines)

            assert http.put(f"/deployments/{model}/1", json={"replicas": 1}).status_code == 200
            seen = times_it_grew(attempts, 5, 30)
            gaps = [later - earlier for earlier, later in itertools.pairwise(seen)]
            # Without a back-off the agent asked every 0.5 s (its resync interval); with it each wait doubles.
            assert gaps[-1] >= 3.0 and gaps[-1] > 2 * gaps[0], gaps
            assert statuses(etcd, prefix, model) == []
            # Fixed: the archive is back and the deployment is applied again (a new spec). The agent tries at once,
            # not after the next wait of its back-off (8 s).
            kept.rename(blob)
            fixed_at = time.monotonic()
            assert http.put(f"/deployments/{model}/1", json={"replicas": 1}).status_code == 200
            wait_until(lambda: bool(statuses(etcd, prefix, model)), 6, "a replica of the fixed deployment")
            assert time.monotonic() - fixed_at < 6
        finally:
            http.delete(f"/deployments/{model}/1")
            try:
                wait_until(lambda: not statuses(etcd, prefix, model), 30, "replicas stopped")
            finally:
                stop_agent(agent.process)
        # Logged once per reason, not once per attempt.
        assert agent.log.read_text().count(f"deployment {model}:1 cannot start") == 1, agent.log.read_text()[-3000:]


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """An etcd of this test's own, which it may freeze (the session's is shared); stopped in any case."""
    server = EtcdServer(tmp_path / "own-etcd").start()
    try:
        yield server
    finally:
        pid = server.process.pid
        if pid is not None and server.process.running:
            os.kill(pid, signal.SIGCONT)
        server.stop()


#: How long the test freezes etcd: longer than the agent's lease (2 s), so the lease is gone when etcd wakes up.
FROZEN_SECONDS = 5.0
#: The agent's deadline on one etcd call in this test (``--etcd-timeout``).
AGENT_ETCD_TIMEOUT = 1.0


@contextlib.contextmanager
def frozen(server: EtcdServer) -> Iterator[None]:
    """etcd stopped by SIGSTOP (it holds its connections and answers nothing, like a host cut off), then resumed."""
    pid = server.process.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_an_agent_carries_on_through_a_frozen_etcd_and_recovers_after_it(own_etcd: EtcdServer, tmp_path: Path) -> None:
    """Carries on: while etcd is frozen its calls give up at the deadline (it says so) and SIGTERM still stops it.
    Recovers: once etcd answers, its node record and its replicas' statuses are back under a lease it keeps
    renewing, and a deployment created afterwards starts."""
    etcd, prefix = own_etcd.endpoint, "/hydro-frozen-agent/"
    with (
        ManagerUnderTest(etcd, prefix, tmp_path / "manager") as manager,
        httpx.Client(base_url=manager.api, timeout=60) as http,
    ):
        agent = start_agent(etcd, prefix, manager.url, tmp_path, "--etcd-timeout", str(AGENT_ETCD_TIMEOUT))

        def said(text: str) -> int:
            return agent.log.read_text(errors="replace").count(text)

        refresh_failed = "could not refresh the instance lease"
        try:
            register(http, "before")
            assert http.put("/deployments/before/1", json={"replicas": 1}).status_code == 200
            wait_until(lambda: bool(statuses(etcd, prefix, "before")), 60, "a replica of before")
            with frozen(own_etcd):
                frozen_at = time.monotonic()
                wait_until(lambda: said(refresh_failed) >= 2, 10, "lease refreshes that gave up at the deadline")
                # The rest of the outage: the lease (2 s) must run out inside etcd.
                time.sleep(max(0.0, FROZEN_SECONDS - (time.monotonic() - frozen_at)))

            def announced() -> bool:
                return bool(etcd_prefix_items(etcd, prefix + "nodes/")) and bool(statuses(etcd, prefix, "before"))

            wait_until(announced, 30, "the agent's node and replica status announced again")
            # Under a lease it renews: still there after several lease TTLs.
            renewed_until = time.monotonic() + 3 * 2
            while time.monotonic() < renewed_until:
                assert announced(), "the agent's records expired after etcd came back"
                time.sleep(0.2)
            register(http, "after")
            assert http.put("/deployments/after/1", json={"replicas": 1}).status_code == 200
            wait_until(lambda: bool(statuses(etcd, prefix, "after")), 30, "a replica of a deployment made afterwards")
            # Told to stop while etcd is frozen: it stops its replicas and exits, each etcd call giving up.
            family = descendants(agent.process.pid or 0)
            with frozen(own_etcd):
                assert agent.process.pid is not None
                os.kill(agent.process.pid, signal.SIGTERM)
                wait_until(lambda: not agent.process.running, 30, "the agent exiting while etcd is frozen")
            assert agent.process.returncode == 0, agent.log.read_text()[-3000:]
            assert [pid for pid in family if Path(f"/proc/{pid}").exists()] == []
        finally:
            # What the agent announced goes with its lease if it could not revoke it.
            for model in ("before", "after"):
                http.delete(f"/deployments/{model}/1")
            try:
                wait_until(lambda: not etcd_prefix_items(etcd, prefix + "replicas/"), 30, "replicas stopped")
            finally:
                stop_agent(agent.process)
