"""Per-replica status (``replicas/`` in etcd, ``instances`` of a deployment) with real processes.

A real etcd, xds_control, manager (`python -m manager_api`) and `hydro agent` (the process deployer) start real
runtime + sidecar pairs. The deployment view shows each replica starting, ready, crash-looping with its error or
draining; the records live under the agent's lease, so a SIGKILLed agent's statuses vanish with it. Model folders
are checked against the digest recorded at upload before the runtime loads them.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aetcd
import pytest
from hydro_mesh import descendants
from typer.testing import CliRunner

from manager_api.cli import app
from manager_api.client import ManagerClient
from manager_api.etcd_server import EtcdServer
from manager_api.ports import free_port
from manager_api.processes import ChildProcess, http_ok, wait_until
from protos.topology.replicas import ReplicaStatus

LEASE_TTL = 2
SERVING_YAML = """\
runtime: python
files: [model.py]
entrypoint: {entrypoint}
signature:
  inputs: [{{name: x, datatype: FP32, shape: [-1]}}]
  outputs: [{{name: y, datatype: FP32, shape: [-1]}}]
"""
DOUBLE = "def predict(inputs):\n    return {'y': inputs['x'] * 2}\n"
BROKEN = """
class Broken:
    def load(self):
        raise RuntimeError("cannot read the weights: checksum boom-7f3a")

    def predict(self, inputs):
        return inputs
"""

#: The ``instances`` of a deployment, as the API returns them.
Instances = list[dict[str, Any]]


@dataclass
class Stack:
    etcd: EtcdServer
    prefix: str
    root: Path
    xds_port: int
    api: ManagerClient
    url: str
    processes: list[ChildProcess] = field(default_factory=list)
    agent: ChildProcess | None = None

    @property
    def agent_dir(self) -> Path:
        return self.root / "agent"

    def start_agent(self) -> ChildProcess:
        argv = [sys.executable, "-m", "manager_api.cli", "agent", "--node", "n1", "--advertise-address", "127.0.0.1"]
        argv += ["--manager", self.url, "--etcd", self.etcd.endpoint, "--xds", f"127.0.0.1:{self.xds_port}"]
        argv += ["--prefix", self.prefix, "--data-dir", str(self.agent_dir), "--lease-ttl", str(LEASE_TTL)]
        self.agent = ChildProcess("agent-n1", argv, log_path=self.root / "agent.log").start()
        self.processes.append(self.agent)
        wait_until(lambda: bool(self.etcd_records("nodes/")), 60, "the agent's node record")
        return self.agent

    def etcd_records(self, under: str) -> dict[str, dict[str, Any]]:
        """JSON records under ``prefix + under``, read from etcd itself."""

        async def read() -> dict[str, dict[str, Any]]:
            host, port = self.etcd.endpoint.rsplit(":", 1)
            async with aetcd.Client(host=host, port=int(port)) as client:
                found = await client.get_prefix((self.prefix + under).encode())
            return {kv.key.decode()[len(self.prefix) :]: json.loads(kv.value) for kv in found}

        return asyncio.run(read())

    def push(self, name: str, code: str = DOUBLE, entrypoint: str = "model:predict") -> dict[str, Any]:
        folder = self.root / "models" / f"{name}-{uuid.uuid4().hex[:6]}"
        folder.mkdir(parents=True)
        (folder / "serving.yaml").write_text(SERVING_YAML.format(entrypoint=entrypoint))
        # Named, so that no two models share an archive (and a digest).
        (folder / "model.py").write_text(f"# {name}\n{code}")
        return self.api.push_model(name, folder)

    def instances(self, model: str, version: int = 1) -> Instances:
        return list(self.api.get_deployment(model, version)["instances"])


@pytest.fixture(scope="module")
def stack(etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """xds_control, a manager without a deployer of its own, and one `hydro agent` (node n1)."""
    root = tmp_path_factory.mktemp("instance-status")
    prefix = f"/hydro-status-{uuid.uuid4().hex[:8]}/"
    xds_port, api_port = free_port(), free_port()
    url = f"http://127.0.0.1:{api_port}"
    processes: list[ChildProcess] = []
    api = ManagerClient(url)
    built: Stack | None = None
    try:
        xds = [sys.executable, "-m", "xds_control", "--etcd", etcd_server.endpoint, "--prefix", prefix]
        processes.append(ChildProcess("xds", [*xds, "--port", str(xds_port)], log_path=root / "xds.log").start())
        manager = [sys.executable, "-m", "manager_api", "--etcd", etcd_server.endpoint, "--prefix", prefix]
        manager += ["--data-dir", str(root / "manager"), "--port", str(api_port), "--log-level", "warning"]
        processes.append(ChildProcess("manager", manager, log_path=root / "manager.log").start())
        processes[-1].wait_ready(lambda: http_ok(f"{url}/healthz"), 60)
        built = Stack(etcd_server, prefix, root, xds_port, api, url, processes)
        built.start_agent()
        yield built
    finally:
        api.close()
        family: set[int] = set()
        for process in reversed(built.processes if built else processes):
            family |= descendants(process.pid or 0) if process.running else set()
            process.stop()
        for pid in family:
            if Path(f"/proc/{pid}").exists() and pid != os.getpid():
                os.kill(pid, signal.SIGKILL)


def watch_states(read: Callable[[], Instances], until: Callable[[Instances], bool], timeout: float) -> list[Instances]:
    """Poll ``read`` until ``until`` holds; every distinct answer seen on the way, in order."""
    seen: list[Instances] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = read()
        if not seen or seen[-1] != current:
            seen.append(current)
        if until(current):
            return seen
        time.sleep(0.05)
    raise AssertionError(f"not reached within {timeout} s; last seen: {seen[-1:]}")


def states(instances: Instances) -> list[str]:
    return sorted(i["state"] for i in instances)


def test_a_good_model_is_starting_then_ready(stack: Stack) -> None:
    stack.push("good")
    created = stack.api.deploy("good", 1, 1)
    assert created["ready_replicas"] == 0
    seen = watch_states(lambda: stack.instances("good"), lambda i: states(i) == ["ready"], 90)
    assert ["starting"] in [states(s) for s in seen], seen
    deployment = stack.api.get_deployment("good", 1)
    assert deployment["ready_replicas"] == 1
    [instance] = deployment["instances"]
    assert instance["node"] == "n1" and instance["restarts"] == 0 and instance["port"] > 0
    assert instance["last_error"] is None and instance["next_restart_at"] is None
    # The record in etcd, leased, beside (not instead of) the EDS instance record.
    record = ReplicaStatus.model_validate(
        stack.etcd_records(f"replicas/good/1/{instance['id']}")[f"replicas/good/1/{instance['id']}"]
    )
    assert record.state == "ready" and record.node == "n1"
    assert list(stack.etcd_records("instances/good/1/")) == [f"instances/good/1/{instance['id']}"]
    # The runtime was told the registered digest (the manager computed it at upload).
    assert (stack.agent_dir / "replicas" / instance["id"] / "expected-files.json").is_file()

    # The CLI shows the per-instance states.
    runner = CliRunner()
    env = {"HYDRO_API_URL": None, "HYDRO_TOKEN": None, "COLUMNS": "200"}
    table = runner.invoke(app, ["get", "deployments", "good", "--api", stack.url], env=env)
    assert table.exit_code == 0, table.output
    assert "INSTANCES" in table.stdout and "1 ready" in table.stdout
    described = runner.invoke(app, ["describe", "deployment", "good:1", "--api", stack.url], env=env)
    assert described.exit_code == 0, described.output
    assert instance["id"] in described.stdout and "RESTARTS" in described.stdout


def test_scale_down_drains_then_the_status_is_gone(stack: Stack) -> None:
    stack.push("scaled")
    stack.api.deploy("scaled", 1, 2)
    watch_states(lambda: stack.instances("scaled"), lambda i: states(i) == ["ready", "ready"], 120)
    stack.api.deploy("scaled", 1, 1)
    seen = watch_states(lambda: stack.instances("scaled"), lambda i: states(i) == ["ready"], 60)
    assert ["draining", "ready"] in [states(s) for s in seen], seen
    assert len(stack.etcd_records("replicas/scaled/1/")) == 1
    stack.api.delete_deployment("scaled", 1)
    wait_until(lambda: not stack.etcd_records("replicas/scaled/"), 60, "the statuses of a deleted deployment gone")


def test_a_killed_runtime_is_restarted_and_its_death_kept_as_last_error(stack: Stack) -> None:
    stack.push("victim")
    stack.api.deploy("victim", 1, 1)
    [before] = watch_states(lambda: stack.instances("victim"), lambda i: states(i) == ["ready"], 90)[-1]
    assert stack.agent is not None
    [runtime] = [pid for pid in descendants(stack.agent.pid or 0) if b"--name\0victim\0" in cmdline(pid)]
    os.kill(runtime, signal.SIGKILL)

    def back(instances: Instances) -> bool:
        return states(instances) == ["ready"] and instances[0]["restarts"] == 1

    seen = watch_states(lambda: stack.instances("victim"), back, 90)
    assert any(states(s) != ["ready"] for s in seen), seen
    after = seen[-1][0]
    assert after["id"] == before["id"] and after["since"] > before["since"]
    assert after["last_error"].startswith(f"runtime-{before['id']} killed by SIGKILL"), after["last_error"]
    stack.api.delete_deployment("victim", 1)
    wait_until(lambda: not stack.etcd_records("replicas/victim/"), 60, "the victim's status gone")


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_a_model_that_crashes_on_load_is_crash_looping_with_its_error(stack: Stack) -> None:
    stack.push("broken", BROKEN, "model:Broken")
    stack.api.deploy("broken", 1, 1)

    def crash_looping(instances: Instances) -> bool:
        return states(instances) == ["crash-looping"] and instances[0]["last_error"] is not None

    [first] = watch_states(lambda: stack.instances("broken"), crash_looping, 90)[-1]
    assert "exited with code 1" in first["last_error"]
    assert "checksum boom-7f3a" in first["last_error"]
    assert len(first["last_error"]) <= 2048
    assert first["next_restart_at"] is not None and first["next_restart_at"] > first["since"]
    # It keeps being restarted, with back-off: the count grows and the error stays.
    [later] = watch_states(
        lambda: stack.instances("broken"), lambda i: crash_looping(i) and i[0]["restarts"] >= first["restarts"] + 2, 120
    )[-1]
    assert later["id"] == first["id"] and "checksum boom-7f3a" in later["last_error"]
    assert stack.api.get_deployment("broken", 1)["ready_replicas"] == 0
    assert not stack.etcd_records("instances/broken/")
    stack.api.delete_deployment("broken", 1)
    wait_until(lambda: not stack.etcd_records("replicas/broken/"), 60, "the crash-looping replica's status gone")


def test_a_tampered_folder_is_refused_and_reported(stack: Stack) -> None:
    version = stack.push("tampered")
    artifact = version["artifact"]
    assert artifact["folder_digest"].startswith("sha256:") and set(artifact["files"]) == {"model.py", "serving.yaml"}
    # The agent's cache already holds this digest's folder, altered after the fact.
    cached = stack.agent_dir / "artifacts" / "folders" / "sha256" / artifact["digest"].split(":", 1)[1]
    cached.mkdir(parents=True)
    (cached / "serving.yaml").write_text(SERVING_YAML.format(entrypoint="model:predict"))
    (cached / "model.py").write_text(DOUBLE.replace("* 2", "* 0"))
    stack.api.deploy("tampered", 1, 1)

    def refused(instances: Instances) -> bool:
        return states(instances) == ["crash-looping"] and "registered digest" in (instances[0]["last_error"] or "")

    [instance] = watch_states(lambda: stack.instances("tampered"), refused, 90)[-1]
    assert (
        f"does not match its registered digest {artifact['folder_digest']}: model.py differs"
        in (instance["last_error"])
    )
    stack.api.delete_deployment("tampered", 1)
    wait_until(lambda: not stack.etcd_records("replicas/tampered/"), 60, "the refused replica's status gone")
    shutil.rmtree(cached)


def test_a_version_registered_without_a_folder_digest_still_deploys(stack: Stack) -> None:
    version = stack.push("legacy")
    # A record written before folder digests existed: no folder_digest, no files.
    key = f"models/legacy/{version['version']}"
    record = stack.etcd_records(key)[key]
    record["artifact"] = {k: v for k, v in record["artifact"].items() if k not in ("folder_digest", "files")}

    async def rewrite() -> None:
        host, port = stack.etcd.endpoint.rsplit(":", 1)
        async with aetcd.Client(host=host, port=int(port)) as client:
            await client.put((stack.prefix + key).encode(), json.dumps(record).encode())

    asyncio.run(rewrite())
    assert stack.api.get_model("legacy")["versions"][0]["artifact"]["folder_digest"] is None
    stack.api.deploy("legacy", 1, 1)
    [instance] = watch_states(lambda: stack.instances("legacy"), lambda i: states(i) == ["ready"], 90)[-1]
    assert not (stack.agent_dir / "replicas" / instance["id"] / "expected-files.json").exists()
    stack.api.delete_deployment("legacy", 1)
    wait_until(lambda: not stack.etcd_records("replicas/legacy/"), 60, "the legacy replica's status gone")


def test_a_sigkilled_agent_s_statuses_vanish_with_its_lease(stack: Stack) -> None:
    stack.push("orphan")
    stack.api.deploy("orphan", 1, 1)
    watch_states(lambda: stack.instances("orphan"), lambda i: states(i) == ["ready"], 90)
    assert stack.agent is not None
    family = descendants(stack.agent.pid or 0)
    try:
        stack.agent.signal_group(signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: not stack.etcd_records("replicas/"), LEASE_TTL + 10, "the dead agent's statuses gone")
        gone_after = time.monotonic() - killed_at
        assert stack.instances("orphan") == [] and not stack.etcd_records("instances/")
        # Not removed by anyone: the lease ran out.
        assert gone_after >= LEASE_TTL - 1, gone_after
    finally:
        # Its runtimes and sidecars die with it (parent-death signal); make sure, then bring the agent back.
        stack.agent.stop()
        for pid in family:
            if Path(f"/proc/{pid}").exists() and pid != os.getpid():
                os.kill(pid, signal.SIGKILL)
        stack.api.delete_deployment("orphan", 1)
        stack.start_agent()
