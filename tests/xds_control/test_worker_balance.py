"""Envoy's workers share the mesh's connections evenly: every listener xds_control builds balances accepted
connections exactly over the workers instead of leaving the choice to the kernel.

The mesh's proxies hold few long-lived connections (an ingress worker keeps one HTTP/2 connection to each sidecar
it calls), so the kernel's random pick leaves one worker of two with all of them half of the time, for as long as
the connections live. The tests read what Envoy loaded (/config_dump) and its per-worker connection gauges.

One stack for the module: etcd, xds_control, the ingress Envoy and one replica (runtime + sidecar) of a python
model that echoes its input.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from ingress_stack import ingress_stack

from manager_api.deployer.replica import Replica
from manager_api.etcd_server import EtcdServer
from manager_api.processes import wait_until
from protos.topology import Signature, TensorSpec

MODEL_FOLDER = Path(__file__).resolve().parent / "controllable_model"
MODEL = "ctl"
SIGNATURE = Signature(
    inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 1])],
    outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1, 1])],
)
BODY = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [2.0]}]})
#: listener.<address>_<port>.worker_<n>.downstream_cx_active: the connections one worker holds on one listener.
WORKER_GAUGE = re.compile(r"^listener\.[\d.]+_(\d+)\.worker_(\d+)\.downstream_cx_active: (\d+)$")


@dataclass
class Mesh:
    listen_port: int
    ingress_admin_port: int
    replica: Replica


@pytest.fixture(scope="module")
def mesh(etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    work = tmp_path_factory.mktemp("balance")
    folder = work / "model"
    shutil.copytree(MODEL_FOLDER, folder, ignore=shutil.ignore_patterns("__pycache__"))
    with ingress_stack(etcd_server.endpoint, work) as stack:
        stack.put_model(MODEL, 1, SIGNATURE, app=MODEL)
        (replica,) = stack.start_replicas(MODEL, 1, [folder])
        url = f"{stack.url}/v2/models/{MODEL}/infer"
        wait_until(lambda: httpx.post(url, content=BODY).status_code == 200, 30, "the ingress route to the replica")
        yield Mesh(stack.listen_port, stack.admin_port, replica)


def loaded_listener(admin_port: int, name: str) -> dict[str, Any]:
    """The active listener ``name`` as Envoy holds it."""
    dump = httpx.get(f"http://127.0.0.1:{admin_port}/config_dump?resource=dynamic_listeners", timeout=5).json()
    for config in dump["configs"]:
        if config["name"] == name:
            listener: dict[str, Any] = config["active_state"]["listener"]
            return listener
    raise AssertionError(f"no active listener {name!r} in {dump}")


def connections_per_worker(admin_port: int, listen_port: int) -> list[int]:
    """Open downstream connections of each worker on the listener bound to ``listen_port``, by worker number."""
    text = httpx.get(f"http://127.0.0.1:{admin_port}/stats?filter=downstream_cx_active", timeout=5).text
    found = {}
    for line in text.splitlines():
        match = WORKER_GAUGE.match(line)
        if match and int(match.group(1)) == listen_port:
            found[int(match.group(2))] = int(match.group(3))
    return [found[worker] for worker in sorted(found)]


def test_ingress_and_sidecar_listeners_balance_exactly(mesh: Mesh) -> None:
    for admin_port, name in ((mesh.ingress_admin_port, "ingress"), (mesh.replica.admin_port, "inbound")):
        assert loaded_listener(admin_port, name)["connection_balance_config"] == {"exact_balance": {}}


def test_connections_spread_evenly_over_the_workers(mesh: Mesh) -> None:
    ingress = mesh.ingress_admin_port, mesh.listen_port
    # Earlier clients' connections must be gone: the balancer counts them while they are open.
    wait_until(lambda: sum(connections_per_worker(*ingress)) == 0, 10, "earlier client connections to close")
    workers = len(connections_per_worker(*ingress))
    assert workers >= 1
    clients = [http.client.HTTPConnection("127.0.0.1", mesh.listen_port, timeout=10) for _ in range(2 * workers)]
    try:
        # One request on each kept-alive connection: every ingress worker then serves two clients, and calls the
        # sidecar over one HTTP/2 connection of its own.
        for client in clients:
            client.request("POST", f"/v2/models/{MODEL}/infer", BODY, {"content-type": "application/json"})
            response = client.getresponse()
            assert response.status == 200, response.read()
            response.read()
        assert connections_per_worker(*ingress) == [2] * workers
        sidecar = mesh.replica.admin_port, mesh.replica.inbound_port
        # The sidecar runs as many workers as the ingress (same machine, Envoy's default): one connection each.
        wait_until(lambda: sum(connections_per_worker(*sidecar)) == workers, 10, "the ingress workers' connections")
        assert connections_per_worker(*sidecar) == [1] * workers
    finally:
        for client in clients:
            client.close()
