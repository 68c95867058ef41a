"""One request through the whole mesh, from nothing: `hydro up` with real etcd, Envoys and runtimes.

Registers the iris model, deploys two replicas, infers over REST and gRPC through the ingress, sees both
replicas serve, moves application weights between two versions, survives a SIGKILLed runtime, and gets OIP
errors (not hangs, not HTML) once the deployment is gone. Ends by stopping `hydro up` with SIGTERM and
checking that nothing it started is left.
"""

from __future__ import annotations

import collections
import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hydro_mesh import EXPECTED, ROWS, Mesh
from tritonclient.utils import InferenceServerException

from manager_api.client import ApiError
from manager_api.processes import wait_until

pytestmark = pytest.mark.e2e


def _labels(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    return [int(x) for x in np.asarray(outputs["label"]["data"]).ravel()]


def _served_by(mesh: Mesh, count: int) -> collections.Counter[str]:
    seen: collections.Counter[str] = collections.Counter()
    for _ in range(count):
        response = mesh.infer()
        assert response.status_code == 200, response.text
        seen[response.headers["x-hydro-served-by"]] += 1
    return seen


def test_walking_skeleton(mesh: Mesh, model_dir: Path) -> None:
    expected = EXPECTED
    v1 = mesh.api.push_model("iris", model_dir)
    assert v1["version"] == 1 and v1["runtime"] == "sklearn"
    assert mesh.api.push_model("iris", model_dir)["version"] == 2

    mesh.api.deploy("iris", 1, replicas=2)
    mesh.api.put_application("iris", [("iris", 1, 100)])
    wait_until(lambda: mesh.infer().status_code == 200, 120, "iris through the ingress")

    # REST and gRPC through the ingress, correct classes.
    assert _labels(mesh.infer()) == expected
    client = grpcclient.InferenceServerClient(mesh.grpc_target)
    try:
        tensor = grpcclient.InferInput("input", list(ROWS.shape), "FP64")
        tensor.set_data_from_numpy(ROWS)
        # No header: the ingress routes on the model name in the request.
        result = client.infer("iris", [tensor])
        assert result.as_numpy("label").tolist() == expected
    finally:
        client.close()

    # Both replicas serve.
    wait_until(lambda: mesh.api.get_deployment("iris", 1)["ready_replicas"] == 2, 60, "two ready instances")
    wait_until(lambda: len(_served_by(mesh, 20)) == 2, 30, "traffic on both replicas")
    replicas_v1 = set(_served_by(mesh, 20))

    # xds_control records every connected proxy and what it acknowledged; none rejected anything.
    def proxies() -> dict[str, dict[str, object]]:
        return {p["node_id"]: p for p in mesh.api.list_proxies()}

    wait_until(lambda: len(proxies()) == 3, 30, "the ingress and two sidecars in /api/v1/proxies")
    assert sorted(p["role"] for p in proxies().values()) == ["ingress", "sidecar", "sidecar"]
    assert all(p["last_nack"] is None for p in proxies().values())

    # Weights move between versions without restarting anything.
    mesh.api.deploy("iris", 2, replicas=1)
    wait_until(lambda: mesh.api.get_deployment("iris", 2)["ready_replicas"] == 1, 60, "version 2 ready")
    mesh.api.put_application("iris", [("iris", 1, 50), ("iris", 2, 50)])

    def versions_seen(n: int) -> collections.Counter[str]:
        return collections.Counter(mesh.infer().json()["model_version"] for _ in range(n))

    wait_until(lambda: set(versions_seen(40)) == {"1", "2"}, 30, "a 50/50 split")
    mesh.api.put_application("iris", [("iris", 1, 0), ("iris", 2, 100)])
    wait_until(lambda: versions_seen(20) == {"2": 20}, 30, "all traffic on version 2")
    mesh.api.put_application("iris", [("iris", 1, 100)])
    wait_until(lambda: versions_seen(20) == {"1": 20}, 30, "all traffic back on version 1")
    assert set(_served_by(mesh, 20)) == replicas_v1, "the same replicas served before and after: no restart"

    # A SIGKILLed runtime: the other replica answers meanwhile, and the runtime comes back.
    victims = mesh.runtime_pids("iris", 1)
    assert len(victims) == 2, victims
    os.kill(victims[0], signal.SIGKILL)
    failures = [r.status_code for r in (mesh.infer() for _ in range(50)) if r.status_code != 200]
    assert failures == [], "the ingress answers from the other replica while one is down"

    def restarted() -> bool:
        pids = mesh.runtime_pids("iris", 1)
        return len(pids) == 2 and victims[0] not in pids

    wait_until(restarted, 60, "the killed runtime restarted")
    wait_until(lambda: len(_served_by(mesh, 20)) == 2, 60, "the restarted replica back in EDS")

    # Deleting the deployment that serves the application: an OIP error, quickly, not a hang.
    mesh.api.put_application("iris", [("iris", 2, 100)])
    mesh.api.delete_deployment("iris", 2)

    def oip_error() -> bool:
        response = mesh.infer(timeout=10)
        return response.status_code == 503 and response.headers["content-type"] == "application/json"

    wait_until(oip_error, 30, "an OIP error after the deployment is deleted")
    # Envoy's reason as an OIP error, naming what has no ready replica.
    expected = "no healthy upstream: no ready replica of model version iris:2 (hydro status shows why)"
    assert mesh.infer().json() == {"error": expected}
    client = grpcclient.InferenceServerClient(mesh.grpc_target)
    try:
        started = time.monotonic()
        with pytest.raises(InferenceServerException) as grpc_error:
            client.infer("iris", [tensor], client_timeout=10)
        assert time.monotonic() - started < 10
        assert grpc_error.value.status() == "StatusCode.UNAVAILABLE", grpc_error.value
    finally:
        client.close()


def test_manager_errors_are_json(mesh: Mesh) -> None:
    with pytest.raises(ApiError) as missing:
        mesh.api.deploy("no-such-model", 1, replicas=1)
    assert missing.value.status == 404
    assert "no-such-model" in missing.value.message
