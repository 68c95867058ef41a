"""Real runtime processes (`python -m runtimes`) on free ports, driven over REST and gRPC with tritonclient.

One long-lived runtime per model kind serves most tests (sklearn iris, and a python model that doubles its input);
tests about process lifetime (SIGTERM, load failures) start their own. Every process is stopped in a finalizer.

This module never imports protos.inference_pb2: tritonclient's service_pb2 defines the same `inference` package
and protobuf refuses both in one process. tritonclient's messages are wire-compatible, so raw gRPC requests here
are built with them.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sklearn.datasets import load_iris
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from manager_api.ports import free_port
from manager_api.processes import ChildProcess, http_ok, wait_until

ROOT = Path(__file__).resolve().parents[2]
IRIS_EXAMPLE = ROOT / "examples" / "iris"
IRIS_ROWS = load_iris().data[[0, 50, 100]]
IRIS_LABELS = [0, 1, 2]
APP_HEADER = "x-hydro-application"

DOUBLER_MODEL = """
import os
import time


class Doubler:
    def load(self):
        self.factor = 2.0

    def predict(self, inputs):
        x = inputs["x"]
        if (x < 0).any():
            raise ValueError("negative values are not allowed")
        if (x == 7777).any():
            # Not an Exception: it would otherwise leave the worker thread and stop the event loop.
            raise KeyboardInterrupt("the model interrupted itself")
        if (x >= 1000).any():
            # A slow request, for the graceful-shutdown test: say it started, then take a while.
            marker = os.environ.get("DOUBLER_MARKER")
            if marker:
                with open(marker, "a") as started:
                    print("started", file=started)
            time.sleep(1.5)
        return {"y": x * self.factor}


def always_fails(inputs):
    raise RuntimeError("this model cannot predict anything")
"""

DOUBLER_SERVING = """
runtime: python
files: [model.py]
entrypoint: {entrypoint}
signature:
  inputs: [{{name: x, datatype: FP32, shape: [-1, 3]}}]
  outputs: [{{name: y, datatype: FP32, shape: [-1, 3]}}]
"""


@dataclass
class Runtime:
    process: ChildProcess
    name: str
    version: int
    grpc_port: int
    http_port: int

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def wait_ready(self, timeout: float = 30) -> None:
        # Not ChildProcess.wait_ready: its "exited" error is swallowed by wait_until as a retryable failure, so a
        # crashed runtime would cost the whole timeout.
        url = f"{self.http}/v2/health/ready"
        wait_until(lambda: not self.process.running or http_ok(url), timeout, f"{self.process.name} ready")
        if not self.process.running:
            raise AssertionError(f"{self.process.name} exited with {self.process.returncode}:\n{self.log()}")

    def wait_exit(self, timeout: float) -> int:
        wait_until(lambda: not self.process.running, timeout, f"{self.process.name} to exit")
        code = self.process.returncode
        assert code is not None
        return code

    def log(self) -> str:
        assert self.process.log_path is not None
        return self.process.log_path.read_text(errors="replace")


class Launcher:
    """Starts runtimes and stops every one of them, whatever happened."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[Runtime] = []

    def start(
        self,
        model_dir: Path,
        name: str,
        version: int = 1,
        env: dict[str, str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> Runtime:
        grpc_port, http_port = free_port(), free_port()
        argv = [
            sys.executable,
            "-m",
            "runtimes",
            "--model-dir",
            str(model_dir),
            "--name",
            name,
            "--version",
            str(version),
            "--host",
            "127.0.0.1",
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(http_port),
            "--shutdown-grace",
            "5",
            *extra_args,
        ]
        label = f"runtime-{name}-{len(self.started)}"
        process = ChildProcess(
            label, argv, cwd=ROOT, env={**os.environ, **(env or {})}, log_path=self.logs / f"{label}.log"
        )
        runtime = Runtime(process, name, version, grpc_port, http_port)
        self.started.append(runtime)
        process.start()
        return runtime

    def stop_all(self) -> None:
        for runtime in self.started:
            runtime.process.stop(grace=10)


def _make_iris(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    train = runpy.run_path(str(IRIS_EXAMPLE / "train.py"))["train"]  # the example's own training script
    train(folder)
    shutil.copy(IRIS_EXAMPLE / "serving.yaml", folder / "serving.yaml")
    return folder


def _make_doubler(folder: Path, entrypoint: str = "model:Doubler") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(DOUBLER_MODEL)
    (folder / "serving.yaml").write_text(DOUBLER_SERVING.format(entrypoint=entrypoint))
    return folder


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("models")
    return {"iris": _make_iris(base / "iris"), "doubler": _make_doubler(base / "doubler")}


@pytest.fixture(scope="module")
def served(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Runtime]]:
    launcher = Launcher(tmp_path_factory.mktemp("runtime-logs"))
    try:
        # Both start before either is awaited: their imports overlap.
        runtimes = {
            "iris": launcher.start(model_dirs["iris"], "iris", 1),
            "doubler": launcher.start(model_dirs["doubler"], "doubler", 3),
        }
        for runtime in runtimes.values():
            runtime.wait_ready()
        yield runtimes
    finally:
        launcher.stop_all()


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path / "logs")
    try:
        yield launcher
    finally:
        launcher.stop_all()


@pytest.fixture
def iris(served: dict[str, Runtime]) -> Runtime:
    return served["iris"]


@pytest.fixture
def doubler(served: dict[str, Runtime]) -> Runtime:
    return served["doubler"]


def _iris_body(rows: np.ndarray = IRIS_ROWS) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP64", "data": rows.tolist()}]}


def _outputs(response: httpx.Response) -> dict[str, dict[str, Any]]:
    assert response.status_code == 200, response.text
    return {o["name"]: o for o in response.json()["outputs"]}


def _error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    message = response.json()["error"]
    assert isinstance(message, str) and message
    return message


# -- inference -------------------------------------------------------------------------------------------------


def test_rest_infer_iris(iris: Runtime) -> None:
    response = httpx.post(f"{iris.http}/v2/models/iris/infer", json={**_iris_body(), "id": "req-1"})
    outputs = _outputs(response)
    body = response.json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("iris", "1", "req-1")
    assert outputs["label"]["data"] == IRIS_LABELS
    assert outputs["label"]["datatype"] == "INT64" and outputs["label"]["shape"] == [3]
    probabilities = np.asarray(outputs["probabilities"]["data"]).reshape(outputs["probabilities"]["shape"])
    assert probabilities.shape == (3, 3) and np.argmax(probabilities, axis=1).tolist() == IRIS_LABELS

    flat = _iris_body()
    flat["inputs"][0]["data"] = IRIS_ROWS.ravel().tolist()
    versioned = httpx.post(f"{iris.http}/v2/models/iris/versions/1/infer", json=flat)
    assert _outputs(versioned)["label"]["data"] == IRIS_LABELS


def test_rest_requested_output_only(iris: Runtime) -> None:
    body = {**_iris_body(), "outputs": [{"name": "label"}]}
    outputs = _outputs(httpx.post(f"{iris.http}/v2/models/iris/infer", json=body))
    assert list(outputs) == ["label"]


def test_tritonclient_grpc_infer(iris: Runtime) -> None:
    client = grpcclient.InferenceServerClient(iris.grpc_target)
    try:
        tensor = grpcclient.InferInput("input", list(IRIS_ROWS.shape), "FP64")
        tensor.set_data_from_numpy(IRIS_ROWS)
        result = client.infer("iris", [tensor])
        assert result.as_numpy("label").tolist() == IRIS_LABELS
        assert result.as_numpy("probabilities").shape == (3, 3)
        response = result.get_response()
        assert (response.model_name, response.model_version) == ("iris", "1")
        # tritonclient sends raw_input_contents, so outputs come back raw too.
        assert len(response.raw_output_contents) == 2
    finally:
        client.close()


def test_tritonclient_http_binary_infer(iris: Runtime) -> None:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{iris.http_port}")
    try:
        tensor = httpclient.InferInput("input", list(IRIS_ROWS.shape), "FP64")
        tensor.set_data_from_numpy(IRIS_ROWS, binary_data=True)
        outputs = [
            httpclient.InferRequestedOutput("label", binary_data=True),
            httpclient.InferRequestedOutput("probabilities", binary_data=False),
        ]
        result = client.infer("iris", [tensor], outputs=outputs)
        assert result.as_numpy("label").tolist() == IRIS_LABELS
        assert result.as_numpy("probabilities").shape == (3, 3)
        assert result.get_output("label")["parameters"]["binary_data_size"] == 3 * 8
        assert "data" in result.get_output("probabilities")

        # No outputs named: tritonclient asks for all of them in binary (binary_data_output).
        everything = client.infer("iris", [tensor], model_version="1")
        assert everything.as_numpy("label").tolist() == IRIS_LABELS
        assert everything.get_response()["model_version"] == "1"

        # JSON all the way, and a gzip-compressed request body.
        tensor.set_data_from_numpy(IRIS_ROWS, binary_data=False)
        plain = client.infer("iris", [tensor], request_compression_algorithm="gzip")
        assert plain.as_numpy("label").tolist() == IRIS_LABELS
    finally:
        client.close()


def test_grpc_message_larger_than_grpc_default(iris: Runtime) -> None:
    rows = np.tile(IRIS_ROWS, (60_000, 1))  # 5.8 MB of FP64, above gRPC's 4 MiB default
    client = grpcclient.InferenceServerClient(iris.grpc_target)
    try:
        tensor = grpcclient.InferInput("input", list(rows.shape), "FP64")
        tensor.set_data_from_numpy(rows)
        labels = client.infer("iris", [tensor]).as_numpy("label")
        assert labels.shape == (180_000,) and labels[:3].tolist() == IRIS_LABELS
    finally:
        client.close()


def test_grpc_typed_contents(doubler: Runtime) -> None:
    """A request with typed contents (not raw) gets typed contents back."""
    request = service_pb2.ModelInferRequest(model_name="doubler")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    tensor.contents.fp32_contents.extend([1, 2, 3, 4, 5, 6])
    with grpc.insecure_channel(doubler.grpc_target) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert (response.model_name, response.model_version) == ("doubler", "3")
    assert not response.raw_output_contents
    (output,) = response.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("y", "FP32", [2, 3])
    assert list(output.contents.fp32_contents) == [2, 4, 6, 8, 10, 12]


# -- metadata and health ---------------------------------------------------------------------------------------


def test_metadata_rest_and_grpc(iris: Runtime) -> None:
    expected = {
        "name": "iris",
        "versions": ["1"],
        "platform": "sklearn",
        "inputs": [{"name": "input", "datatype": "FP64", "shape": [-1, 4]}],
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP64", "shape": [-1, 3]},
        ],
    }
    for path in ("/v2/models/iris", "/v2/models/iris/versions/1"):
        response = httpx.get(iris.http + path)
        assert response.status_code == 200 and response.json() == expected
    server = httpx.get(f"{iris.http}/v2").json()
    assert server["name"] == "hydro-serving" and "binary_tensor_data" in server["extensions"]

    client = grpcclient.InferenceServerClient(iris.grpc_target)
    try:
        metadata = client.get_model_metadata("iris", as_json=True)
        assert metadata["name"] == "iris" and metadata["versions"] == ["1"]
        assert metadata["inputs"] == [{"name": "input", "datatype": "FP64", "shape": ["-1", "4"]}]
        assert client.get_server_metadata(as_json=True)["name"] == "hydro-serving"
    finally:
        client.close()


def test_health_rest_and_grpc(iris: Runtime) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/iris/ready", "/v2/models/iris/versions/1/ready"):
        assert httpx.get(iris.http + path).status_code == 200, path
    client = grpcclient.InferenceServerClient(iris.grpc_target)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("iris") and client.is_model_ready("iris", "1")
    finally:
        client.close()
    with grpc.insecure_channel(iris.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING


# -- addressing ------------------------------------------------------------------------------------------------


def test_model_name_rule_rest(iris: Runtime) -> None:
    url = f"{iris.http}/v2/models/flowers/infer"
    not_here = "model 'flowers' is not served here (this runtime serves 'iris')"
    assert _error(httpx.post(url, json=_iris_body()), 404) == not_here
    assert _error(httpx.get(f"{iris.http}/v2/models/flowers"), 404) == not_here
    assert _error(httpx.get(f"{iris.http}/v2/models/flowers/ready"), 404) == not_here
    # The header must name the requested model: another application's header does not count.
    assert _error(httpx.post(url, json=_iris_body(), headers={APP_HEADER: "other"}), 404) == not_here

    response = httpx.post(url, json=_iris_body(), headers={APP_HEADER: "flowers"})
    assert _outputs(response)["label"]["data"] == IRIS_LABELS
    assert (response.json()["model_name"], response.json()["model_version"]) == ("iris", "1")
    assert httpx.get(f"{iris.http}/v2/models/flowers/ready", headers={APP_HEADER: "flowers"}).status_code == 200


def test_model_name_rule_grpc(iris: Runtime) -> None:
    client = grpcclient.InferenceServerClient(iris.grpc_target)
    try:
        tensor = grpcclient.InferInput("input", list(IRIS_ROWS.shape), "FP64")
        tensor.set_data_from_numpy(IRIS_ROWS)
        with pytest.raises(InferenceServerException) as missing:
            client.infer("flowers", [tensor])
        assert missing.value.status() == "StatusCode.NOT_FOUND" and "flowers" in missing.value.message()
        result = client.infer("flowers", [tensor], headers={APP_HEADER: "flowers"})
        assert result.as_numpy("label").tolist() == IRIS_LABELS
        assert result.get_response().model_name == "iris"
    finally:
        client.close()


def test_version_mismatch(iris: Runtime) -> None:
    message = _error(httpx.post(f"{iris.http}/v2/models/iris/versions/2/infer", json=_iris_body()), 404)
    no_version = "model 'iris' has no version '2' here (this runtime serves version 1)"
    assert message == no_version
    assert _error(httpx.get(f"{iris.http}/v2/models/iris/versions/2"), 404) == no_version
    assert _error(httpx.get(f"{iris.http}/v2/models/iris/versions/2/ready"), 404) == no_version
    client = grpcclient.InferenceServerClient(iris.grpc_target)
    try:
        tensor = grpcclient.InferInput("input", list(IRIS_ROWS.shape), "FP64")
        tensor.set_data_from_numpy(IRIS_ROWS)
        with pytest.raises(InferenceServerException) as wrong:
            client.infer("iris", [tensor], model_version="2")
        assert wrong.value.status() == "StatusCode.NOT_FOUND"
        assert "has no version '2'" in wrong.value.message(), wrong.value.message()
    finally:
        client.close()


# -- bad requests ----------------------------------------------------------------------------------------------


def _tensor(**overrides: Any) -> dict[str, Any]:
    return {**_iris_body()["inputs"][0], **overrides}


BAD_REST_BODIES = {
    "wrong input name": ({"inputs": [_tensor(name="features")]}, ["unknown input 'features'", "input"]),
    "wrong datatype": ({"inputs": [_tensor(datatype="FP32")]}, ["'input'", "FP32", "FP64"]),
    "unknown datatype": ({"inputs": [_tensor(datatype="FLOAT")]}, ["'input'", "FLOAT"]),
    "wrong rank": ({"inputs": [_tensor(shape=[12], data=IRIS_ROWS.ravel().tolist())]}, ["'input'", "[12]", "[-1, 4]"]),
    "wrong fixed dim": ({"inputs": [_tensor(shape=[4, 3], data=IRIS_ROWS.ravel().tolist())]}, ["'input'", "[4, 3]"]),
    "data length": ({"inputs": [_tensor(shape=[4, 4])]}, ["'input'", "12", "16"]),
    "missing inputs list": ({"outputs": []}, ["inputs"]),
    "missing input tensor": ({"inputs": []}, ["missing input 'input'"]),
    "non-numeric data": ({"inputs": [_tensor(data=["a", "b"], shape=[1, 2])]}, ["'input'"]),
    "unknown output": ({**_iris_body(), "outputs": [{"name": "colour"}]}, ["'colour'"]),
    "shape not a list": ({"inputs": [_tensor(shape="3x4")]}, ["'input'", "shape"]),
}


@pytest.mark.parametrize("case", list(BAD_REST_BODIES))
def test_rest_bad_request(iris: Runtime, case: str) -> None:
    body, fragments = BAD_REST_BODIES[case]
    message = _error(httpx.post(f"{iris.http}/v2/models/iris/infer", json=body), 400)
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "empty"),
        (b"[1, 2]", "JSON object"),
        (b'{"inputs": "\xc3\x28"}', "UTF-8"),
    ],
)
def test_rest_unreadable_body(iris: Runtime, content: bytes, fragment: str) -> None:
    response = httpx.post(f"{iris.http}/v2/models/iris/infer", content=content)
    assert fragment in _error(response, 400)


def test_rest_binary_size_mismatch(iris: Runtime) -> None:
    header = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP64", "parameters": {"binary_data_size": 32}}]}
    ).encode()
    raw = np.zeros(3, dtype="<f8").tobytes()  # 24 bytes where 32 are announced
    response = httpx.post(
        f"{iris.http}/v2/models/iris/infer",
        content=header + raw,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert "binary_data_size" in _error(response, 400)


def test_rest_routing_errors_are_json(iris: Runtime) -> None:
    assert "/v3/nothing" in _error(httpx.get(f"{iris.http}/v3/nothing"), 404)
    assert (
        _error(httpx.get(f"{iris.http}/v2/models/iris/infer"), 405)
        == "method GET is not allowed for /v2/models/iris/infer"
    )
    assert (
        _error(httpx.delete(f"{iris.http}/v2/health/live"), 405) == "method DELETE is not allowed for /v2/health/live"
    )


def _grpc_infer(runtime: Runtime, request: service_pb2.ModelInferRequest) -> grpc.RpcError:
    with grpc.insecure_channel(runtime.grpc_target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(request, timeout=10)
    return error.value


def _raw_request(name: str = "input", datatype: str = "FP64", shape: Sequence[int] = (3, 4), rows: int = 3) -> Any:
    request = service_pb2.ModelInferRequest(model_name="iris")
    request.inputs.add(name=name, datatype=datatype, shape=list(shape))
    request.raw_input_contents.append(IRIS_ROWS[:rows].astype("<f8").tobytes())
    return request


BAD_GRPC_REQUESTS: dict[str, tuple[Callable[[], Any], list[str]]] = {
    "wrong input name": (lambda: _raw_request(name="features"), ["unknown input 'features'"]),
    "wrong datatype": (lambda: _raw_request(datatype="FP32"), ["'input'", "FP32", "FP64"]),
    "wrong shape": (lambda: _raw_request(shape=(3, 2, 2)), ["'input'", "[3, 2, 2]", "[-1, 4]"]),
    "data length": (lambda: _raw_request(shape=(4, 4)), ["'input'", "12", "16"]),
    "missing inputs": (lambda: service_pb2.ModelInferRequest(model_name="iris"), ["missing input 'input'"]),
    "raw count": (
        lambda: service_pb2.ModelInferRequest(model_name="iris", raw_input_contents=[b"", b""]),
        ["raw_input_contents"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_GRPC_REQUESTS))
def test_grpc_bad_request(iris: Runtime, case: str) -> None:
    build, fragments = BAD_GRPC_REQUESTS[case]
    error = _grpc_infer(iris, build())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    for fragment in fragments:
        assert fragment in (error.details() or ""), error.details()


def test_tritonclient_grpc_wrong_input_name(iris: Runtime) -> None:
    client = grpcclient.InferenceServerClient(iris.grpc_target)
    try:
        tensor = grpcclient.InferInput("features", list(IRIS_ROWS.shape), "FP64")
        tensor.set_data_from_numpy(IRIS_ROWS)
        with pytest.raises(InferenceServerException) as error:
            client.infer("iris", [tensor])
        assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "features" in error.value.message()
    finally:
        client.close()


# -- model failures --------------------------------------------------------------------------------------------


def test_predict_error_then_next_request(doubler: Runtime) -> None:
    url = f"{doubler.http}/v2/models/doubler/infer"

    def body(values: list[float]) -> dict[str, Any]:
        return {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": values}]}

    message = _error(httpx.post(url, json=body([1, -2, 3])), 500)
    assert "negative values are not allowed" in message and "ValueError" in message
    assert _outputs(httpx.post(url, json=body([1, 2, 3])))["y"]["data"] == [2, 4, 6]
    message = _error(httpx.post(url, json=body([1, 7777, 3])), 500)
    assert "KeyboardInterrupt: the model interrupted itself" in message
    assert _outputs(httpx.post(url, json=body([1, 2, 3])))["y"]["data"] == [2, 4, 6]

    client = grpcclient.InferenceServerClient(doubler.grpc_target)
    try:
        tensor = grpcclient.InferInput("x", [1, 3], "FP32")
        tensor.set_data_from_numpy(np.array([[-1, 0, 1]], dtype=np.float32))
        with pytest.raises(InferenceServerException) as error:
            client.infer("doubler", [tensor])
        assert error.value.status() == "StatusCode.INTERNAL"
        assert "negative values are not allowed" in error.value.message()
        tensor.set_data_from_numpy(np.array([[1, 2, 3]], dtype=np.float32))
        assert client.infer("doubler", [tensor]).as_numpy("y").tolist() == [[2, 4, 6]]
    finally:
        client.close()
    assert doubler.process.running


# -- under load -------------------------------------------------------------------------------------------------

#: A model whose predict holds the GIL for 30 ms of CPU, like pure-Python pre-processing.
BURNER_MODEL = """
import time


def predict(inputs):
    deadline = time.thread_time() + 0.03
    while time.thread_time() < deadline:
        pass
    return {"y": inputs["x"] * 2}
"""


def test_health_and_metadata_stay_responsive_under_full_load(launcher: Launcher, tmp_path: Path) -> None:
    """8 clients keep the CPU-bound model busy; health, readiness and metadata over REST and gRPC still answer
    quickly. Were predict run on the event loop, each probe would queue behind up to 8 predictions (~240 ms)."""
    folder = tmp_path / "burner"
    folder.mkdir()
    (folder / "model.py").write_text(BURNER_MODEL)
    (folder / "serving.yaml").write_text(DOUBLER_SERVING.format(entrypoint="model:predict"))
    runtime = launcher.start(folder, "burner")
    runtime.wait_ready()
    body = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [[1, 2, 3]]}]}
    stop = threading.Event()
    answered: list[int] = []

    def load() -> None:
        with httpx.Client(base_url=runtime.http, timeout=30) as client:
            while not stop.is_set():
                answered.append(client.post("/v2/models/burner/infer", json=body).status_code)

    workers = [threading.Thread(target=load) for _ in range(8)]
    for worker in workers:
        worker.start()
    latencies: dict[str, list[float]] = {"rest": [], "grpc": []}
    grpc_client = grpcclient.InferenceServerClient(runtime.grpc_target)
    try:
        wait_until(lambda: len(answered) >= 16, 30, "the load to be running")
        before = len(answered)
        with httpx.Client(base_url=runtime.http, timeout=10) as probe, grpc.insecure_channel(runtime.grpc_target) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            window = time.monotonic() + 2.0
            while len(latencies["grpc"]) < 20 or time.monotonic() < window:
                started = time.perf_counter()
                assert probe.get("/v2/health/ready").status_code == 200
                assert probe.get("/v2/models/burner").json()["name"] == "burner"
                latencies["rest"].append((time.perf_counter() - started) / 2)
                started = time.perf_counter()
                check = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
                assert check.status == health_pb2.HealthCheckResponse.SERVING
                assert grpc_client.get_model_metadata("burner").name == "burner"
                latencies["grpc"].append((time.perf_counter() - started) / 2)
        during = len(answered) - before
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
        grpc_client.close()
    assert set(answered) == {200}
    # The model really was busy meanwhile: at 30 ms of CPU a call, 2 s of probing overlapped dozens of predictions.
    assert during >= 30, during
    for protocol, values in latencies.items():
        ordered = sorted(values)
        median, worst = ordered[len(ordered) // 2], ordered[-1]
        print(f"{protocol}: median {median * 1000:.1f} ms, max {worst * 1000:.1f} ms over {len(values)} probes")
        assert median < 0.06 and worst < 0.5, (protocol, ordered)


# -- process lifetime ------------------------------------------------------------------------------------------


def test_sigterm_finishes_in_flight_requests_and_exits_zero(
    model_dirs: dict[str, Path], launcher: Launcher, tmp_path: Path
) -> None:
    marker = tmp_path / "predictions-started"
    runtime = launcher.start(model_dirs["doubler"], "doubler", 1, env={"DOUBLER_MARKER": str(marker)})
    runtime.wait_ready()
    slow = np.array([[1000, 1, 2]], dtype=np.float32)
    results: dict[str, Any] = {}

    def over_rest() -> None:
        body = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": slow.tolist()}]}
        results["rest"] = httpx.post(f"{runtime.http}/v2/models/doubler/infer", json=body, timeout=20)

    def over_grpc() -> None:
        client = grpcclient.InferenceServerClient(runtime.grpc_target)
        try:
            tensor = grpcclient.InferInput("x", [1, 3], "FP32")
            tensor.set_data_from_numpy(slow)
            results["grpc"] = client.infer("doubler", [tensor], client_timeout=20).as_numpy("y").tolist()
        except Exception as exc:
            results["grpc"] = exc
        finally:
            client.close()

    threads = [threading.Thread(target=over_rest), threading.Thread(target=over_grpc)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: marker.exists() and len(marker.read_text().split()) == 2, 10, "both slow predictions")
        runtime.process.signal_group(signal.SIGTERM)
        started = time.monotonic()
        assert runtime.wait_exit(10) == 0, runtime.log()
        assert time.monotonic() - started < 5
    finally:
        for thread in threads:
            thread.join(20)
    assert _outputs(results["rest"])["y"]["data"] == [2000, 2, 4]
    assert results["grpc"] == [[2000, 2, 4]]
    assert "SIGTERM received" in runtime.log()


def test_sigterm_when_idle_exits_zero_promptly(model_dirs: dict[str, Path], launcher: Launcher) -> None:
    runtime = launcher.start(model_dirs["iris"], "iris", 1)
    runtime.wait_ready()
    runtime.process.signal_group(signal.SIGTERM)
    started = time.monotonic()
    assert runtime.wait_exit(10) == 0, runtime.log()
    assert time.monotonic() - started < 3


def test_load_failures_exit_nonzero_with_reason(
    model_dirs: dict[str, Path], launcher: Launcher, tmp_path: Path
) -> None:
    missing_file = tmp_path / "iris-without-model"
    shutil.copytree(model_dirs["iris"], missing_file)
    (missing_file / "model.joblib").unlink()
    cases = {
        "model.joblib": missing_file,
        "has no attribute 'Nope'": _make_doubler(tmp_path / "bad-entrypoint", "model:Nope"),
        "cannot import module 'missing_module'": _make_doubler(tmp_path / "bad-module", "missing_module:Model"),
        "warm-up": _make_doubler(tmp_path / "fails-warm-up", "model:always_fails"),
    }
    # All start together; each must exit by itself with its reason in the log.
    runtimes = {reason: launcher.start(folder, "broken") for reason, folder in cases.items()}
    for reason, runtime in runtimes.items():
        code = runtime.wait_exit(30)
        log = runtime.log()
        assert code != 0, log
        assert "cannot load model 'broken'" in log and reason in log, _exit_story(code, log)


def _exit_story(code: int, log: str) -> str:
    """What a failed runtime's exit code and log say about where it died (for assertion messages)."""
    # The runtime's first line ("loading ...") comes before anything of gRPC starts in it: a log without it is a
    # process that died before our code ran (docs/runtimes.md, "A log with only a gRPC line").
    where = "after its first log line" if "loading model" in log else "before the runtime's first log line"
    how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    return f"the runtime died {where} ({how}); its log:\n{log}"


def test_load_failure_reason_is_logged_at_any_log_level(launcher: Launcher, tmp_path: Path) -> None:
    """The reason a runtime gives up is logged even with --log-level critical (it was an ERROR record, dropped)."""
    folder = _make_doubler(tmp_path / "fails-warm-up", "model:always_fails")
    runtime = launcher.start(folder, "broken", extra_args=["--log-level", "critical"])
    code = runtime.wait_exit(30)
    log = runtime.log()
    assert code == 1, _exit_story(code, log)
    assert "cannot load model 'broken'" in log and "this model cannot predict anything" in log, log


#: Run as its own process: imports manager_api first, as tests/conftest.py and every entry point of ours do, starts a
#: grpc.aio server and makes one call (gRPC idle afterwards, like this test process between tests), then starts
#: children with ChildProcess, as Launcher does, and prints their exit codes and any that logged gRPC's poller crash.
FORK_PROBE = """
import asyncio, json, sys
from pathlib import Path
import manager_api
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from manager_api.processes import ChildProcess, wait_until

async def main(children, logs):
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    codes, crashes = [], []
    for index in range(children):
        child = ChildProcess(f"c{index}", ["/bin/true"], log_path=logs / f"c{index}.log").start()
        await asyncio.to_thread(wait_until, lambda: not child.running, 10, f"child {index} to exit", 0.005)
        child.stop(grace=1)
        codes.append(child.returncode)
        text = (logs / f"c{index}.log").read_text(errors="replace")
        if "epoll_wait" in text:
            crashes.append(text.strip())
    await server.stop(1)
    print(json.dumps({"codes": codes, "crashes": crashes[:3]}))

asyncio.run(main(int(sys.argv[1]), Path(sys.argv[2])))
"""


def test_children_reach_exec_even_when_the_environment_asks_for_grpc_fork_support(tmp_path: Path) -> None:
    """The flake of test_load_failures_exit_nonzero_with_reason: a runtime's log held only gRPC's
    "(event_engine) Epoll1Poller ... encountered epoll_wait error: Bad file descriptor" and the process died before
    the runtime's first line. That is a child killed between fork and exec: with grpcio's fork handlers on in the
    parent, the child's handler restarts gRPC's poller thread and Popen's close_fds closes its epoll fd under it
    (grpc/grpc#43055). Our processes turn the handlers off, but an environment that set GRPC_ENABLE_FORK_SUPPORT
    used to win: 9 of 600 children died so, each log holding just that line."""
    env = {**os.environ, "GRPC_ENABLE_FORK_SUPPORT": "1"}
    probe = subprocess.run(
        [sys.executable, "-c", FORK_PROBE, "400", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    died = [code for code in result["codes"] if code != 0]
    assert not died, (died, result["crashes"])


def test_bad_command_line_exits_nonzero() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "runtimes", "--model-dir", "/nonexistent", "--name", "x", "--version", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "--version" in result.stderr


def test_port_in_use_exits_nonzero(model_dirs: dict[str, Path]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = [sys.executable, "-m", "runtimes", "--model-dir", str(model_dirs["iris"]), "--name", "iris"]
        for ports in (
            ["--grpc-port", str(port), "--http-port", str(free_port())],
            ["--grpc-port", str(free_port()), "--http-port", str(port)],
        ):
            result = subprocess.run(
                [*argv, "--version", "1", *ports], cwd=ROOT, capture_output=True, text=True, timeout=30
            )
            assert result.returncode != 0
            assert "cannot listen" in result.stderr and str(port) in result.stderr
            # The model and ports are named before gRPC is touched (binding the gRPC port is its first use).
            before_failure = result.stderr.partition("cannot listen")[0]
            assert "loading model 'iris' version 1" in before_failure, result.stderr
