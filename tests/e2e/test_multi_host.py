"""Three hosts as network namespaces: the control plane on one, a `hydro agent` on each of the two others.

"ctl" runs `hydro up --no-local-node` (etcd, xds_control, manager API, ingress) on its bridge address; "h1" and
"h2" each run `hydro agent`, which downloads the model from the manager and registers its sidecars at its own
address. A two-replica deployment gets one replica per host. A SIGKILLed runtime is restarted and comes back in
EDS. Then every process of h1 is SIGKILLed under load: its lease expires, its endpoint leaves the ingress's EDS,
its replica moves to h2, and no request fails once the endpoint is gone (the ejection window). Finally h1's agent
starts again and takes its replica back without a failed request (make before break).
"""

from __future__ import annotations

import base64
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from hydro_mesh import EXPECTED, ROWS
from net_namespaces import Host, Network, why_namespaces_are_unavailable

from manager_api.client import ManagerClient
from manager_api.credentials import load_credentials
from manager_api.processes import ChildProcess, http_ok, wait_until

pytestmark = pytest.mark.e2e

# Ports inside fresh namespaces: nothing else can hold them.
ETCD, API, XDS, INGRESS, METRICS = 2379, 8081, 18000, 8080, 18001
LEASE_TTL = 3
PREFIX = "/hydro/"
CLUSTER = "model|iris|1"
AGENTS = {"h1": 11, "h2": 12}


@dataclass
class Hosts:
    net: Network
    ctl: Host
    data_dir: Path
    hydro_up: ChildProcess
    api: ManagerClient
    token: str
    logs: Path
    agents: dict[str, ChildProcess] = field(default_factory=dict)
    #: Every process started, in start order, for the teardown.
    processes: list[ChildProcess] = field(default_factory=list)

    def start_agent(self, name: str) -> ChildProcess:
        """`hydro agent` on host ``name`` (again, after a kill: same name, same data dir)."""
        host, ctl = self.host(name), self.ctl.address
        command = [sys.executable, "-m", "manager_api.cli", "agent", "--node", name]
        command += ["--advertise-address", host.address, "--manager", f"http://{ctl}:{API}"]
        command += ["--etcd", f"{ctl}:{ETCD}", "--xds", f"{ctl}:{XDS}"]
        command += ["--data-dir", str(self.logs / name), "--lease-ttl", str(LEASE_TTL)]
        env = {"HYDRO_TOKEN": self.token}
        self.agents[name] = _start(f"agent-{name}", host, command, self.logs / f"{name}.log", env)
        self.processes.append(self.agents[name])
        return self.agents[name]

    @property
    def ingress(self) -> str:
        return f"http://{self.ctl.address}:{INGRESS}"

    def host(self, name: str) -> Host:
        return self.net.hosts[name]

    def etcd(self, prefix: str) -> dict[str, dict[str, Any]]:
        """JSON records under ``PREFIX + prefix``, read through etcd's JSON gateway from inside ctl."""
        key = (PREFIX + prefix).encode()
        end = key[:-1] + bytes([key[-1] + 1])

        def read() -> dict[str, dict[str, Any]]:
            body = {"key": base64.b64encode(key).decode(), "range_end": base64.b64encode(end).decode()}
            reply = httpx.post(f"http://{self.ctl.address}:{ETCD}/v3/kv/range", json=body, timeout=5)
            reply.raise_for_status()
            kvs = reply.json().get("kvs", [])
            return {base64.b64decode(kv["key"]).decode(): json.loads(base64.b64decode(kv["value"])) for kv in kvs}

        return self.ctl.call(read)

    def instances(self) -> list[dict[str, Any]]:
        return list(self.etcd("instances/iris/1/").values())

    def eds(self) -> set[tuple[str, int]]:
        """The healthy endpoints of the iris cluster as the ingress Envoy has them (admin /clusters)."""
        bootstrap = yaml.safe_load((self.data_dir / "logs" / "ingress.yaml").read_text())
        admin = bootstrap["admin"]["address"]["socket_address"]["port_value"]

        def read() -> set[tuple[str, int]]:
            statuses = httpx.get(f"http://127.0.0.1:{admin}/clusters?format=json", timeout=5).json()
            hosts = set()
            for status in statuses.get("cluster_statuses", []):
                if status["name"] != CLUSTER:
                    continue
                for host in status.get("host_statuses", []):
                    flags = host.get("health_status", {})
                    if flags.get("eds_health_status") == "HEALTHY" and not any(v is True for v in flags.values()):
                        address = host["address"]["socket_address"]
                        hosts.add((address["address"], int(address["port_value"])))
            return hosts

        return self.ctl.call(read)

    def runtime_pids(self, host: str) -> list[int]:
        found = []
        for pid in self.host(host).pids():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"runtimes" in cmdline and b"iris" in cmdline:
                found.append(pid)
        return found


def _start(name: str, host: Host, command: list[str], log: Path, env: dict[str, str] | None = None) -> ChildProcess:
    return ChildProcess(
        name, host.argv(command), env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, log_path=log
    ).start()


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    name = f"hy{os.getpid() % 100000}"
    reason = why_namespaces_are_unavailable(f"{name}-probe")
    if reason:
        pytest.skip(reason)
    net = Network(name)
    processes: list[ChildProcess] = []
    hosts: Hosts | None = None
    try:
        ctl = net.add_host("ctl", 1)
        for agent, octet in AGENTS.items():
            net.add_host(agent, octet)
        data_dir = tmp_path / "ctl"
        up = [sys.executable, "-m", "manager_api.cli", "up", "--data-dir", str(data_dir), "--no-local-node"]
        up += ["--host", ctl.address, "--control-host", ctl.address, "--ingress-port", str(INGRESS)]
        up += ["--api-port", str(API), "--xds-port", str(XDS), "--etcd-port", str(ETCD)]
        up += ["--xds-metrics-port", str(METRICS)]
        hydro_up = _start("hydro-up", ctl, up, tmp_path / "hydro-up.log")
        processes.append(hydro_up)
        hydro_up.wait_ready(lambda: ctl.call(http_ok, f"http://{ctl.address}:{INGRESS}/v2/health/ready"), 90)
        credentials = load_credentials(data_dir)
        assert credentials is not None, "hydro up wrote no credentials"
        api = ManagerClient(f"http://{ctl.address}:{API}", credentials.token)
        hosts = Hosts(net, ctl, data_dir, hydro_up, api, credentials.token, tmp_path, processes=processes)
        for agent in AGENTS:
            hosts.start_agent(agent)
        yield hosts
    finally:
        # Agents first (they drain their replicas), then the control plane, then whatever is left, then the hosts.
        for process in reversed(processes):
            process.stop(grace=60 if process.name == "hydro-up" else 30)
        for process in processes:
            print(process.log_tail(30))
        leftovers = net.close()
        assert not leftovers, f"processes still running on the hosts after their stop: {leftovers}"


def _infer_body() -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": list(ROWS.shape), "datatype": "FP64", "data": ROWS.tolist()}]}


def _labels(response: httpx.Response) -> list[int] | None:
    if response.status_code != 200:
        return None
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    return [int(x) for x in np.asarray(outputs["label"]["data"]).ravel()]


class Load:
    """Sequential REST inferences through the ingress from inside ctl; every outcome kept with its end time."""

    def __init__(self, hosts: Hosts) -> None:
        self.url = f"{hosts.ingress}/v2/models/iris/infer"
        self.outcomes: list[tuple[float, str, str]] = []
        self._stop = threading.Event()
        self._done = hosts.ctl.submit(self._run)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                try:
                    response = client.post(self.url, json=_infer_body())
                    ok = _labels(response) == EXPECTED
                    outcome = "ok" if ok else f"HTTP {response.status_code}: {response.text[:200]}"
                    served_by = response.headers.get("x-hydro-served-by", "")
                except httpx.HTTPError as exc:
                    outcome, served_by = f"{type(exc).__name__}: {exc}", ""
                self.outcomes.append((time.monotonic(), outcome, served_by))

    def stop(self) -> None:
        self._stop.set()
        self._done()

    def failures(self, since: float = 0.0, until: float = float("inf")) -> list[tuple[float, str, str]]:
        return [o for o in self.outcomes if since <= o[0] < until and o[1] != "ok"]

    def completed(self, since: float = 0.0) -> int:
        return sum(1 for o in self.outcomes if o[0] >= since)


def _host_of(served_by: str) -> str:
    """The node of the instance that answered: ``iris:1/h1-1a2b3c4d`` -> ``h1`` (instance ids start with it)."""
    return served_by.rpartition("/")[2].split("-")[0]


def _endpoint(instance: dict[str, Any]) -> tuple[str, int]:
    return instance["address"], int(instance["port"])


def test_replicas_spread_restart_and_move_when_a_host_dies(hosts: Hosts, model_dir: Path) -> None:
    api, ctl = hosts.api, hosts.ctl
    wait_until(lambda: set(hosts.etcd("nodes/")) == {PREFIX + "nodes/h1", PREFIX + "nodes/h2"}, 60, "both agents")
    assert {n["name"]: n["advertise_address"] for n in hosts.etcd("nodes/").values()} == {
        name: hosts.host(name).address for name in AGENTS
    }

    # One replica per host, each registered at its host's address and in the ingress's EDS.
    ctl.call(api.push_model, "iris", model_dir)
    ctl.call(api.deploy, "iris", 1, 2)
    ctl.call(api.put_application, "iris", [("iris", 1, 100)])
    wait_until(lambda: len(hosts.instances()) == 2, 120, "two ready instances")
    by_node = {i["node"]: i for i in hosts.instances()}
    assert sorted(by_node) == ["h1", "h2"]
    for node, instance in by_node.items():
        assert instance["address"] == hosts.host(node).address
        assert instance["id"].startswith(f"{node}-")
    wait_until(lambda: hosts.eds() == {_endpoint(i) for i in by_node.values()}, 30, "both endpoints in EDS")
    load = Load(hosts)
    try:
        wait_until(lambda: {_host_of(o[2]) for o in load.outcomes[-40:]} >= {"h1", "h2"}, 30, "both hosts serve")
    finally:
        load.stop()
    assert not load.failures(), load.failures()[:5]

    # A SIGKILLed runtime on h1: the replica is restarted on h1 (same instance id) and comes back in EDS.
    [old_pid] = hosts.runtime_pids("h1")
    killed = time.monotonic()
    os.kill(old_pid, 9)

    def restarted() -> bool:
        h1 = [i for i in hosts.instances() if i["node"] == "h1"]
        pids = hosts.runtime_pids("h1")
        return len(h1) == 1 and pids not in ([], [old_pid]) and _endpoint(h1[0]) in hosts.eds()

    wait_until(restarted, 60, "the killed runtime restarted and back in EDS")
    print(f"runtime SIGKILL -> restarted and back in EDS: {time.monotonic() - killed:.2f} s")
    assert [i["id"] for i in hosts.instances() if i["node"] == "h1"] == [by_node["h1"]["id"]]

    # The whole of h1 dies under load: its lease expires, its endpoint leaves EDS, its replica moves to h2.
    h1_endpoint = next(_endpoint(i) for i in hosts.instances() if i["node"] == "h1")
    load = Load(hosts)
    try:
        wait_until(lambda: load.completed() >= 20, 30, "load before the kill")
        killed = time.monotonic()
        victims = hosts.host("h1").kill_everything()
        assert hosts.agents["h1"].pid in victims
        wait_until(lambda: h1_endpoint not in hosts.eds(), LEASE_TTL + 15, "h1's endpoint out of EDS")
        left_eds = time.monotonic()
        wait_until(lambda: PREFIX + "nodes/h1" not in hosts.etcd("nodes/"), 10, "h1's node record gone")
        node_gone = time.monotonic()

        def moved() -> bool:
            instances = hosts.instances()
            return [i["node"] for i in instances] == ["h2", "h2"] and hosts.eds() == {_endpoint(i) for i in instances}

        wait_until(moved, 120, "both replicas on h2 and in EDS")
        moved_at = time.monotonic()
        # Keep the load going on the two h2 replicas for a while before judging.
        wait_until(lambda: load.completed(since=moved_at) >= 100, 60, "load after the move")

        # h1 comes back: its replica moves back make-before-break (h2 stops one only once h1's is ready).
        rejoined = time.monotonic()
        hosts.start_agent("h1")

        def spread_again() -> bool:
            instances = hosts.instances()
            spread = sorted(i["node"] for i in instances) == ["h1", "h2"]
            return spread and hosts.eds() == {_endpoint(i) for i in instances}

        wait_until(spread_again, 120, "one replica per host again")
        spread_at = time.monotonic()
        wait_until(lambda: load.completed(since=spread_at) >= 100, 60, "load after the rejoin")
    finally:
        load.stop()
    window = load.failures(until=left_eds)
    after = load.failures(since=left_eds)
    print(
        f"h1 SIGKILL -> endpoint out of EDS {left_eds - killed:.2f} s, node record gone {node_gone - killed:.2f} s, "
        f"replica moved and in EDS {moved_at - killed:.2f} s; h1 restarted -> one replica per host again "
        f"{spread_at - rejoined:.2f} s; requests: {len(load.outcomes)} ({load.completed(since=killed)} after the "
        f"kill), failed within the window {len(window)}, after it {len(after)}"
    )
    assert left_eds - killed <= LEASE_TTL + 10
    assert not after, f"{len(after)} requests failed after h1 left EDS: {after[:5]}"
    assert {_host_of(o[2]) for o in load.outcomes if o[0] > spread_at} == {"h1", "h2"}
