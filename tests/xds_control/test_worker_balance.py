"""Envoy's workers share the mesh's connections evenly: the sidecar's listener balances accepted connections
exactly over its workers instead of leaving the choice to the kernel; the ingress, whose clients may open a
connection per request, leaves it to the kernel.

A sidecar holds few long-lived connections (an ingress worker keeps one HTTP/2 connection to each sidecar it
calls), so the kernel's random pick leaves one worker of two with all of them half of the time, for as long as
the connections live. The tests read what Envoy loaded (/config_dump) and its per-worker connection gauges.

One stack for the module: etcd, xds_control, the ingress Envoy and one replica (runtime + sidecar) of a python
model that echoes its input.
"""

from __future__ import annotations

import http.client
import json
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
from protos.topology.models import Signature, TensorSpec
from xds_control.bootstrap import connections_per_worker

MODEL_FOLDER = Path(__file__).resolve().parent / "controllable_model"
MODEL = "ctl"
SIGNATURE = Signature(
    inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 1])],
    outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1, 1])],
)
BODY = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [2.0]}]})


@dataclass
class Mesh:
    """The module's stack: the ingress's listen and admin ports, and the one replica behind it."""

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


def test_the_sidecar_balances_exactly_and_the_ingress_leaves_it_to_the_kernel(mesh: Mesh) -> None:
    assert loaded_listener(mesh.replica.admin_port, "inbound")["connection_balance_config"] == {"exact_balance": {}}
    assert "connection_balance_config" not in loaded_listener(mesh.ingress_admin_port, "ingress")


def test_connections_spread_evenly_over_the_workers(mesh: Mesh) -> None:
    ingress = mesh.ingress_admin_port, mesh.listen_port
    # Earlier clients' connections must be gone: the balancer counts them while they are open.
    wait_until(lambda: sum(connections_per_worker(*ingress)) == 0, 10, "earlier client connections to close")
    workers = len(connections_per_worker(*ingress))
    assert workers >= 1, "the ingress listener's per-worker gauges"
    clients = [http.client.HTTPConnection("127.0.0.1", mesh.listen_port, timeout=10) for _ in range(4 * workers)]
    try:
        # One request on each kept-alive connection: every ingress worker that got a client calls the sidecar over
        # one HTTP/2 connection of its own (the kernel spreads the clients; with 8 over 2 workers, all on one
        # happens in <1 % of runs, and the check below still holds then).
        for client in clients:
            client.request("POST", f"/v2/models/{MODEL}/infer", BODY, {"content-type": "application/json"})
            response = client.getresponse()
            assert response.status == 200, response.read()
            response.read()
        busy = sum(1 for held in connections_per_worker(*ingress) if held)
        sidecar = mesh.replica.admin_port, mesh.replica.inbound_port
        # At least one per busy ingress worker; more when all these clients landed on one worker and the other
        # still holds the connection it opened for the fixture's requests (idle upstream connections live for an
        # hour). Waiting for exactly one per busy worker failed once in a full run; this is the likely reason (about
        # one run in 128 has all 8 clients on one worker).
        wait_until(lambda: sum(connections_per_worker(*sidecar)) >= busy, 10, "the ingress workers' connections")
        # The sidecar runs as many workers as the ingress (same machine, Envoy's default): at most one each.
        assert max(connections_per_worker(*sidecar)) == 1, connections_per_worker(*sidecar)
    finally:
        for client in clients:
            client.close()
