"""The three-framework iris pipeline (examples/iris-pipeline) through the whole mesh, from nothing (`hydro up`).

python feature extractor -> scikit-learn classifier -> ONNX network scorer: the deployer starts the pipeline runtime
and its sidecar for the application, the ingress routes the application's name to it over REST and gRPC (stock
tritonclient, no header), each stage is named in x-hydro-stages, a change of stages or of a stage's deadline
restarts the pipeline with a new spec while requests keep succeeding, and a stage that is down gives an error
naming it.
"""

from __future__ import annotations

import re
import runpy
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml
from hydro_mesh import EXPECTED, ROWS, Mesh
from tritonclient.grpc import service_pb2, service_pb2_grpc

from manager_api.processes import wait_until

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "iris-pipeline"
APP = "iris-pipeline"
MODELS = {"features": "iris-features", "classifier": "iris-classifier", "scorer": "iris-scorer"}
STAGES = re.compile(r"1=iris-features:1;2=iris-classifier:1;3=iris-scorer:1")
CONCURRENCY = 16
CALLS = 800
#: Envoy counters of streams reset or cut off, by either side of any hop.
RESET_COUNTER = re.compile(r"rx_reset|tx_reset|destroy_with_active_rq|destroy_active_rq")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("iris-pipeline")
    runpy.run_path(str(EXAMPLE / "train_pipeline.py"))["train"](folder)
    return folder


def _infer(mesh: Mesh) -> httpx.Response:
    body = {"inputs": [{"name": "measurements", "shape": list(ROWS.shape), "datatype": "FP64", "data": ROWS.tolist()}]}
    return httpx.post(f"{mesh.ingress}/v2/models/{APP}/infer", json=body, timeout=30)


def _species(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert set(outputs) == {"species", "species_proba"}
    return [int(x) for x in np.asarray(outputs["species"]["data"]).ravel()]


def _envoy_admin_ports(mesh: Mesh) -> dict[str, int]:
    """The admin port of every Envoy of the stack, by its bootstrap file (ingress, sidecars, pipeline sidecar)."""
    ports = {}
    for bootstrap in mesh.data_dir.rglob("*.yaml"):
        document = yaml.safe_load(bootstrap.read_text())
        if isinstance(document, dict) and "admin" in document:
            ports[bootstrap.name] = int(document["admin"]["address"]["socket_address"]["port_value"])
    return ports


def _resets(mesh: Mesh) -> dict[str, int]:
    """The non-zero reset counters of every Envoy of the stack."""
    found = {}
    for envoy, port in _envoy_admin_ports(mesh).items():
        stats = httpx.get(f"http://127.0.0.1:{port}/stats", timeout=10).text
        for line in stats.splitlines():
            name, _, value = line.partition(": ")
            if RESET_COUNTER.search(name) and value.isdigit() and int(value):
                found[f"{envoy} {name}"] = int(value)
    return found


def _concurrent_grpc_calls(mesh: Mesh, request: service_pb2.ModelInferRequest) -> list[list[int]]:
    """CALLS ModelInfer calls through the ingress from CONCURRENCY connections at once: each call's species."""
    # One channel per worker: each is an HTTP/2 connection of its own, as from many clients.
    channels = [grpc.insecure_channel(mesh.grpc_target) for _ in range(CONCURRENCY)]
    try:
        stubs = [service_pb2_grpc.GRPCInferenceServiceStub(channel) for channel in channels]

        def call(index: int) -> list[int]:
            answer = stubs[index % CONCURRENCY].ModelInfer(request, timeout=60)
            return list(answer.outputs[0].contents.int64_contents)

        with ThreadPoolExecutor(CONCURRENCY) as pool:
            return list(pool.map(call, range(CALLS)))
    finally:
        for channel in channels:
            channel.close()


def _pipeline_timeouts(mesh: Mesh) -> list[float]:
    """The --timeout of each running pipeline runtime of APP in this stack (its spec file's folder names it)."""
    pattern = rf"[-]m runtimes.pipeline --spec {mesh.data_dir}/\S*/pipelines/{APP}/"
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    timeouts = []
    for pid in found:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
        except FileNotFoundError:  # it ended since pgrep saw it
            continue
        timeouts.append(float(argv[argv.index("--timeout") + 1]))
    return timeouts


def _stage(model: str, version: int = 1, shadows: list[dict[str, object]] | None = None) -> dict[str, object]:
    return {"variants": [{"model": model, "version": version, "weight": 100}], "shadows": shadows or []}


def test_three_framework_pipeline_through_the_ingress(mesh: Mesh, pipeline_dir: Path) -> None:
    for folder, model in MODELS.items():
        assert mesh.api.push_model(model, pipeline_dir / folder)["version"] == 1
        mesh.api.deploy(model, 1, replicas=1)
    stages = [_stage(model) for model in MODELS.values()]
    created = mesh.api.put_application_stages(APP, stages)
    assert created["pipeline_replicas"] == 1
    wait_until(lambda: _infer(mesh).status_code == 200, 180, "the pipeline through the ingress")

    # REST: the last stage's outputs, every stage named.
    response = _infer(mesh)
    assert _species(response) == EXPECTED
    assert STAGES.fullmatch(response.headers["x-hydro-stages"]), response.headers["x-hydro-stages"]
    assert response.headers["x-hydro-served-by"].startswith(f"{APP}:pipeline/")

    # gRPC with the stock client and no header: the ingress routes on the model name in the request.
    client = grpcclient.InferenceServerClient(mesh.grpc_target)
    try:
        tensor = grpcclient.InferInput("measurements", list(ROWS.shape), "FP64")
        tensor.set_data_from_numpy(ROWS)
        result = client.infer(APP, [tensor])
        assert result.as_numpy("species").tolist() == EXPECTED
    finally:
        client.close()
    # The same call through a plain stub, to see the stages header in the initial metadata.
    request = service_pb2.ModelInferRequest(model_name=APP)
    typed = request.inputs.add(name="measurements", datatype="FP64", shape=list(ROWS.shape))
    typed.contents.fp64_contents.extend(ROWS.ravel().tolist())
    with grpc.insecure_channel(mesh.grpc_target) as channel:
        answer, call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(request, timeout=30)
    metadata = dict(call.initial_metadata())
    assert STAGES.fullmatch(str(metadata["x-hydro-stages"])), metadata
    assert list(answer.outputs[0].contents.int64_contents) == EXPECTED

    # Concurrent calls: all answered, and no Envoy on the way (ingress, pipeline sidecar, stage sidecars) saw a
    # stream reset by either side.
    envoys = _envoy_admin_ports(mesh)
    assert "ingress.yaml" in envoys and any(name.startswith("pipeline-sidecar") for name in envoys), envoys
    resets_before = _resets(mesh)
    assert _concurrent_grpc_calls(mesh, request) == [EXPECTED] * CALLS
    assert _resets(mesh) == resets_before

    status = mesh.api.get_application(APP)["status"]
    assert status["ready"] is True, status
    assert status["pipeline_ready_replicas"] == 1

    # A shadow on stage 3 changes the spec: a new pipeline replica starts, the old one leaves once it is ready,
    # and requests keep being answered meanwhile.
    first = response.headers["x-hydro-served-by"]
    assert mesh.api.push_model("iris-scorer", pipeline_dir / "scorer")["version"] == 2
    mesh.api.deploy("iris-scorer", 2, replicas=1)
    wait_until(lambda: mesh.api.get_deployment("iris-scorer", 2)["ready_replicas"] == 1, 120, "the shadow ready")
    shadowed = [*stages[:2], _stage("iris-scorer", shadows=[{"model": "iris-scorer", "version": 2}])]
    mesh.api.put_application_stages(APP, shadowed)
    failures: list[str] = []

    def moved() -> bool:
        answer = _infer(mesh)
        if answer.status_code != 200:
            failures.append(answer.text)
            return False
        return answer.headers["x-hydro-served-by"] != first

    wait_until(moved, 120, "a pipeline replica with the new spec serving")
    assert failures == [], failures
    assert _species(_infer(mesh)) == EXPECTED

    # A stage's deadline is part of the pipeline's time budget (--timeout, the sum of the stages'): the ingress
    # takes a new one at once, and replicas with the new budget take over, again with every request answered.
    wait_until(lambda: len(_pipeline_timeouts(mesh)) == 1, 60, "the replica of the old spec gone")
    budgets = {m: mesh.api.get_deployment(m, 1)["policies"]["timeout_ms"] for m in MODELS.values()}
    assert _pipeline_timeouts(mesh) == [sum(budgets.values()) / 1000]
    first = _infer(mesh).headers["x-hydro-served-by"]
    mesh.api.deploy("iris-features", 1, replicas=1, policies={"timeout_ms": budgets["iris-features"] - 15_000})
    wait_until(moved, 120, "a pipeline replica with the new time budget serving")
    assert failures == [], failures
    wait_until(lambda: len(_pipeline_timeouts(mesh)) == 1, 60, "the replica of the old budget gone")
    assert _pipeline_timeouts(mesh) == [(sum(budgets.values()) - 15_000) / 1000]

    # Stage 2 down: the answer names it.
    mesh.api.delete_deployment("iris-classifier", 1)

    def stage_named() -> bool:
        answer = _infer(mesh)
        return answer.status_code >= 500 and "stage 2 (iris-classifier:1)" in answer.json().get("error", "")

    wait_until(stage_named, 60, "an error naming stage 2")
    status = mesh.api.get_application(APP)["status"]
    assert status["ready"] is False and "stage 2" in status["reason"], status
