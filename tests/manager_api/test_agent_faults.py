"""A `hydro agent` when a deployment cannot start, and when its etcd stops answering.

A real etcd, a real manager (`python -m manager_api`, no deployer of its own, access log on) and a real agent
(`python -m manager_api.cli agent`). No xds_control runs: replicas stay ``starting`` (their sidecars get no
configuration), which is enough to see that the agent took a deployment up.
"""

from __future__ import annotations

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
        wait_until(lambda: bool(etcd_prefix_items(etcd, prefix + "nodes/")), 60, "the agent's node record")
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
