"""Churn under steady load: nothing the operator does may fail a request.

Run once with every Envoy on state-of-the-world ADS and once on delta ADS. For 60 s, REST and gRPC clients call
the application through the ingress while the weights shift from version 1 to version 2 in 10 steps, version 1
scales 1 -> 3 -> 1, version 2 rolls in and version 1 is removed, and xds_control is killed once (the supervisor
restarts it). Every request must succeed.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hydro_mesh import EXPECTED, ROWS, Mesh

from manager_api.processes import wait_until

pytestmark = pytest.mark.e2e

LOAD_SECONDS = 60.0
#: Requests that must complete on each weight step before the next one (about 2 s of this load).
STEP_REQUESTS = 600


class Load:
    """Background REST and gRPC clients recording every outcome."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.stop = threading.Event()
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []
        self.versions: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._rest), threading.Thread(target=self._grpc)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(30)

    def total(self) -> int:
        with self._lock:
            return sum(self.outcomes.values())

    def _record(self, kind: str, ok: bool, detail: str, version: str = "") -> None:
        with self._lock:
            self.outcomes[f"{kind}-{'ok' if ok else 'failed'}"] += 1
            if version:
                self.versions[version] += 1
            if not ok:
                self.failures.append(f"{time.strftime('%H:%M:%S')} {kind}: {detail}"[:300])

    def _rest(self) -> None:
        while not self.stop.is_set():
            try:
                response = self.mesh.infer(timeout=10)
                body = response.json()
                labels = [o["data"] for o in body.get("outputs", []) if o["name"] == "label"]
                ok = response.status_code == 200 and labels == [EXPECTED]
                self._record("rest", ok, f"{response.status_code} {response.text[:150]}", body.get("model_version", ""))
            except Exception as exc:
                self._record("rest", False, repr(exc))

    def _grpc(self) -> None:
        client = grpcclient.InferenceServerClient(self.mesh.grpc_target)
        tensor = grpcclient.InferInput("input", list(ROWS.shape), "FP64")
        tensor.set_data_from_numpy(np.asarray(ROWS))
        try:
            while not self.stop.is_set():
                try:
                    result = client.infer("iris", [tensor], headers={"x-hydro-model": "iris"}, client_timeout=10)
                    ok = result.as_numpy("label").tolist() == EXPECTED
                    self._record("grpc", ok, "wrong labels", result.get_response().model_version)
                except Exception as exc:
                    self._record("grpc", False, repr(exc))
        finally:
            client.close()


def _instances(mesh: Mesh, version: int) -> int:
    """Ready instances (the deployment view lists starting and draining ones too)."""
    return int(mesh.api.get_deployment("iris", version)["ready_replicas"])


def _ingress_routes(mesh: Mesh) -> str:
    """The route configuration version the ingress Envoy last acknowledged (from /api/v1/proxies)."""
    for proxy in mesh.api.list_proxies():
        if proxy["role"] == "ingress":
            return str(proxy["acked"].get("RouteConfiguration", ""))
    return ""


def _pids(pattern: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found if int(pid) != os.getpid()]


@pytest.mark.parametrize("mesh", ["sotw", "delta"], indirect=True)
def test_churn_under_load_fails_no_request(mesh: Mesh, model_dir: Path) -> None:
    assert mesh.api.push_model("iris", model_dir)["version"] == 1
    assert mesh.api.push_model("iris", model_dir)["version"] == 2
    mesh.api.deploy("iris", 1, replicas=1)
    mesh.api.put_application("iris", [("iris", 1, 100)])
    wait_until(lambda: mesh.infer().status_code == 200, 120, "iris through the ingress")

    started = time.monotonic()
    with Load(mesh) as load:
        mesh.api.deploy("iris", 1, replicas=3)
        mesh.api.deploy("iris", 2, replicas=1)
        wait_until(lambda: _instances(mesh, 1) == 3 and _instances(mesh, 2) == 1, 60, "v1 x3 and v2 x1 ready")

        for step in range(1, 11):
            before = _ingress_routes(mesh)
            mesh.api.put_application("iris", [("iris", 1, 100 - 10 * step), ("iris", 2, 10 * step)])
            wait_until(lambda before=before: _ingress_routes(mesh) != before, 30, f"step {step} acknowledged")
            if step == 5:
                mesh.api.deploy("iris", 1, replicas=1)
            if step == 7:
                xds = _pids(mesh.xds_pattern)
                assert len(xds) == 1, xds
                os.kill(xds[0], signal.SIGKILL)
                wait_until(lambda: len(_pids(mesh.xds_pattern)) == 1, 30, "xds_control restarted")
            # Pacing in requests, not seconds: each configuration carries traffic before the next change.
            mark = load.total()
            wait_until(lambda mark=mark: load.total() >= mark + STEP_REQUESTS, 30, f"traffic through step {step}")

        mesh.api.delete_deployment("iris", 1)
        wait_until(lambda: not mesh.runtime_pids("iris", 1), 30, "version 1 stopped")
        remaining = LOAD_SECONDS - (time.monotonic() - started)
        if remaining > 0:
            load.stop.wait(remaining)  # the rest of the 60 s of steady load

    print(f"outcomes {dict(load.outcomes)}, versions {dict(load.versions)}")
    total = sum(load.outcomes.values())
    assert load.failures == [], f"{len(load.failures)} of {total} requests failed: {load.failures[:10]}"
    assert load.outcomes["rest-ok"] > 100 and load.outcomes["grpc-ok"] > 100, load.outcomes
    assert set(load.versions) == {"1", "2"}, load.versions
    # After the restart the ingress converged on the last state: everything on version 2.
    assert collections.Counter(mesh.infer().json()["model_version"] for _ in range(20)) == {"2": 20}
