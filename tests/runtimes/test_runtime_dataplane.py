"""The data plane, the runtime registry, the python runtime and the REST app, in process (no sockets)."""

from __future__ import annotations

import gzip
import struct
import sys
import textwrap
import tracemalloc
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import httpx
import numpy as np
import pytest

from runtimes.base import ModelRuntime, create_runtime, registered_kinds, runtime_class
from runtimes.dataplane import DataPlane, array_inputs, shape_matches
from runtimes.errors import InvalidInput, ModelLoadError, ModelNotFound, ModelNotReady, PredictError
from runtimes.messages import ArrayData, InferRequest, RequestedOutput, RequestInput
from runtimes.python_model import PythonModelRuntime
from runtimes.rest import create_app
from runtimes.serving_config import RUNTIME_KINDS, ServingConfig, load_serving_config, parse_serving_config
from runtimes.tensors import RawData

SIGNATURE = """
runtime: python
entrypoint: model:Model
signature:
  inputs:
    - {name: a, datatype: FP32, shape: [-1, 2]}
    - {name: b, datatype: INT64, shape: [1]}
  outputs:
    - {name: sum, datatype: FP32, shape: [-1]}
    - {name: count, datatype: INT64, shape: [1]}
"""

Predict = Callable[[dict[str, np.ndarray]], Mapping[str, Any]]


def _default_predict(inputs: dict[str, np.ndarray]) -> Mapping[str, Any]:
    return {"sum": inputs["a"].sum(axis=1) + inputs["b"][0], "count": [inputs["a"].shape[0]]}


class FakeRuntime(ModelRuntime):
    kind: ClassVar[str] = "python"

    def __init__(self, predict: Predict = _default_predict) -> None:
        super().__init__(Path("."), parse_serving_config(SIGNATURE))
        self.fn = predict
        self.loaded = False

    def load(self) -> None:
        self.loaded = True

    def predict(self, inputs: dict[str, np.ndarray]) -> Mapping[str, Any]:
        return self.fn(inputs)


def _request(name: str = "m", version: str = "", **arrays: np.ndarray) -> InferRequest:
    if not arrays:
        arrays = {"a": np.array([[1, 2], [3, 4]], dtype=np.float32), "b": np.array([10], dtype=np.int64)}
    return InferRequest(name, version, array_inputs(arrays, FakeRuntime().config.signature))


async def _loaded(predict: Predict = _default_predict) -> DataPlane:
    plane = DataPlane(FakeRuntime(predict), name="m", version=2)
    await plane.load()
    return plane


def test_shape_matches() -> None:
    assert shape_matches((3, 2), (-1, 2))
    assert not shape_matches((3,), (-1, 2))
    assert not shape_matches((3, 3), (-1, 2))


def test_registry_covers_every_runtime_kind() -> None:
    assert set(RUNTIME_KINDS) <= set(registered_kinds())
    assert runtime_class("python") is PythonModelRuntime
    assert runtime_class("sklearn").kind == "sklearn"
    with pytest.raises(KeyError, match="onnx"):  # the message lists the known kinds
        runtime_class("no-such-kind")


async def test_infer_and_response_names() -> None:
    plane = await _loaded()
    assert plane.ready and plane.runtime.loaded  # type: ignore[attr-defined]
    response = await plane.infer(_request())
    assert (response.model_name, response.model_version) == ("m", "2")
    outputs = {o.name: o for o in response.outputs}
    assert outputs["sum"].data.tolist() == [13, 17] and outputs["sum"].data.dtype == np.float32
    assert outputs["count"].data.tolist() == [2] and outputs["count"].data.dtype == np.int64


async def test_requested_outputs() -> None:
    plane = await _loaded()
    request = _request()
    only = InferRequest("m", "", request.inputs, outputs=[RequestedOutput("count")])
    assert [o.name for o in (await plane.infer(only)).outputs] == ["count"]
    unknown = InferRequest("m", "", request.inputs, outputs=[RequestedOutput("mean")])
    with pytest.raises(InvalidInput, match="unknown output 'mean'"):
        await plane.infer(unknown)


async def test_model_name_rule() -> None:
    plane = await _loaded()
    with pytest.raises(ModelNotFound, match="'app'"):
        await plane.infer(_request("app"))
    # An application name is only served by the runtime started for that application.
    with pytest.raises(ModelNotFound, match=r"model 'app' is not served here \(this runtime serves 'm'\)"):
        await plane.infer(_request("app"), application="other")
    response = await plane.infer(_request("app"), application="app")
    assert response.model_name == "m"
    assert (await plane.infer(_request("m", "2"))).model_version == "2"
    with pytest.raises(ModelNotFound, match="version '3'"):
        await plane.infer(_request("m", "3"))
    with pytest.raises(ModelNotFound, match=r"model 'm' has no version '1' here \(this runtime serves version 2\)"):
        plane.model_metadata("m", "1")
    assert plane.model_metadata("app", "", "app").name == "m"
    # An application has no versions, even the one its chosen variant happens to have (the ingress's header
    # routing brings such calls here).
    with pytest.raises(ModelNotFound, match=r"application 'app' has no versions \(asked for version '2'\)"):
        await plane.infer(_request("app", "2"), application="app")


async def test_not_ready() -> None:
    plane = DataPlane(FakeRuntime(), name="m", version=2)
    assert not plane.model_ready("m")
    with pytest.raises(ModelNotReady, match="loading"):
        await plane.infer(_request())
    await plane.load()
    assert plane.model_ready("m")
    plane.stop()
    with pytest.raises(ModelNotReady, match="stopping"):
        await plane.infer(_request())


class InlineRuntime(FakeRuntime):
    """A cheap model predicted on the event loop (FakeRuntime's kind runs on worker threads)."""

    inline_rows: ClassVar[int] = 16


@pytest.mark.parametrize("runtime", [FakeRuntime, InlineRuntime])
async def test_statistics_count_requests_and_executions(runtime: type[FakeRuntime]) -> None:
    # Unbatched, on a worker thread or inline: a request is one inference and one execution of batch size 1.
    plane = DataPlane(runtime(), name="m", version=2)
    await plane.load()
    for _ in range(3):
        await plane.infer(_request())
    with pytest.raises(InvalidInput, match="missing input 'b'"):
        await plane.infer(InferRequest("m", "", _inputs()[:1]))
    with pytest.raises(ModelNotFound, match="model 'other' is not served here"):
        await plane.infer(_request("other"))
    snapshot = plane.statistics.snapshot()
    assert (snapshot.inference_count, snapshot.execution_count) == (3, 3)
    assert (snapshot.stages["success"].count, snapshot.stages["fail"].count) == (3, 1)
    assert snapshot.stages["compute_infer"].count == 3 and snapshot.stages["compute_infer"].ns > 0
    assert list(snapshot.batches) == [1] and snapshot.batches[1]["compute_infer"].count == 3
    assert snapshot.last_inference_ms > 0


def _inputs(**overrides: RequestInput) -> list[RequestInput]:
    base = {
        "a": RequestInput("a", "FP32", (1, 2), ArrayData(np.array([1, 2], dtype=np.float32))),
        "b": RequestInput("b", "INT64", (1,), ArrayData(np.array([1], dtype=np.int64))),
    }
    return list({**base, **overrides}.values())


@pytest.mark.parametrize(
    ("inputs", "fragment"),
    [
        (_inputs(c=RequestInput("c", "FP32", (1,), ArrayData(np.zeros(1)))), "unknown input 'c'"),
        (_inputs(a=RequestInput("a", "FP64", (1, 2), ArrayData(np.zeros(2)))), "'a' has datatype FP64"),
        (_inputs(a=RequestInput("a", "FP32", (2,), ArrayData(np.zeros(2)))), "'a' has shape [2]"),
        (_inputs(a=RequestInput("a", "FP32", (1, 3), ArrayData(np.zeros(3)))), "expects [-1, 2]"),
        (_inputs(a=RequestInput("a", "FP32", (-1, 2), ArrayData(np.zeros(2)))), "sizes must be >= 0"),
        (_inputs(a=RequestInput("a", "FP32", (2, 2), ArrayData(np.zeros(3)))), "'a' has 3 data elements"),
        (_inputs()[:1], "missing input 'b'"),
        ([*_inputs(), _inputs()[0]], "'a' is given more than once"),
    ],
)
async def test_invalid_inputs(inputs: list[RequestInput], fragment: str) -> None:
    plane = await _loaded()
    with pytest.raises(InvalidInput) as error:
        await plane.infer(InferRequest("m", "", inputs))
    assert fragment in str(error.value)


@pytest.mark.parametrize(
    ("predict", "fragment"),
    [
        (lambda inputs: 1 / 0, "ZeroDivisionError"),
        (lambda inputs: [1, 2], "returned list"),
        (lambda inputs: {"sum": [1.0]}, "no output 'count'"),
        (lambda inputs: {"sum": ["x"], "count": [1]}, "'sum' is not FP32"),
        (lambda inputs: {"sum": [[1.0]], "count": [1]}, "'sum' has shape [1, 1]"),
    ],
)
async def test_predict_failures(predict: Predict, fragment: str) -> None:
    plane = DataPlane(FakeRuntime(), name="m", version=2)
    await plane.load()
    plane.runtime.fn = predict  # type: ignore[attr-defined]
    with pytest.raises(PredictError) as error:
        await plane.infer(_request())
    assert fragment in str(error.value)
    plane.runtime.fn = _default_predict  # type: ignore[attr-defined]
    assert (await plane.infer(_request())).outputs


async def test_warm_up_failure_fails_load() -> None:
    calls: list[dict[str, np.ndarray]] = []

    def record(inputs: dict[str, np.ndarray]) -> Mapping[str, Any]:
        calls.append(inputs)
        raise ValueError("zeros are bad")

    plane = DataPlane(FakeRuntime(record), name="m", version=2)
    with pytest.raises(ModelLoadError, match=r"warm-up.*zeros are bad"):
        await plane.load()
    assert plane.state == "failed" and not plane.ready
    (warm,) = calls
    assert warm["a"].shape == (1, 2) and warm["a"].dtype == np.float32 and warm["b"].shape == (1,)


# -- python runtime --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _restore_sys_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # The python runtime puts model folders on sys.path; keep them from leaking into later tests.
    monkeypatch.setattr(sys, "path", list(sys.path))


def _python_folder(tmp_path: Path, code: str, entrypoint: str) -> tuple[Path, ServingConfig]:
    # A module name of its own per test: modules are cached in sys.modules for the whole session.
    module = f"model_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(code))
    (tmp_path / "helper_consts.py").write_text("FACTOR = 3\n")
    (tmp_path / "serving.yaml").write_text(
        SIGNATURE.replace("entrypoint: model:Model", f"entrypoint: {module}:{entrypoint}")
    )
    return tmp_path, load_serving_config(tmp_path)


def test_python_function_entrypoint(tmp_path: Path) -> None:
    folder, config = _python_folder(
        tmp_path,
        """
        from helper_consts import FACTOR  # a sibling module of the model folder

        def predict(inputs):
            return {"sum": inputs["a"].sum(axis=1) * FACTOR, "count": [1]}
        """,
        "predict",
    )
    runtime = create_runtime(folder, config)
    runtime.load()
    result = runtime.predict({"a": np.ones((2, 2), dtype=np.float32), "b": np.array([1])})
    assert result["sum"].tolist() == [6, 6]


def test_python_class_without_load(tmp_path: Path) -> None:
    folder, config = _python_folder(
        tmp_path,
        """
        class Model:
            def predict(self, inputs):
                return {"sum": [0.0], "count": [0]}
        """,
        "Model",
    )
    runtime = create_runtime(folder, config)
    runtime.load()
    assert runtime.predict({})["count"] == [0]


@pytest.mark.parametrize(
    ("code", "entrypoint", "fragment"),
    [
        ("x = 1\n", "Model", "no attribute 'Model'"),
        ("x = 1\n", "x", "neither a class nor a function"),
        ("class Model:\n    pass\n", "Model", "no predict method"),
        ("class Model:\n    def predict(self, i): ...\n    def load(self): raise OSError('no weights')\n", "Model",
         "load() failed: OSError('no weights')"),
        ("raise ImportError('broken dependency')\n", "Model", "broken dependency"),
    ],
)  # fmt: skip
def test_python_entrypoint_errors(tmp_path: Path, code: str, entrypoint: str, fragment: str) -> None:
    folder, config = _python_folder(tmp_path, code, entrypoint)
    with pytest.raises(ModelLoadError) as error:
        create_runtime(folder, config).load()
    assert fragment in str(error.value)


@pytest.mark.parametrize(
    ("code", "entrypoint", "fragment"),
    [
        # MLServer's models are async; here load()'s coroutine was never awaited (the model ran without it, or failed
        # the warm-up on what it should have set), and predict's coroutine failed the warm-up as "returned coroutine".
        ("class Model:\n    async def load(self): self.w = 2\n    def predict(self, i): return {}\n", "Model",
         "load is async def"),
        ("class Model:\n    async def predict(self, i): return {}\n", "Model", "predict is async def"),
        ("async def predict(inputs):\n    return {}\n", "predict", "predict is async def"),
    ],
)  # fmt: skip
def test_python_async_methods_are_named_at_load(tmp_path: Path, code: str, entrypoint: str, fragment: str) -> None:
    folder, config = _python_folder(tmp_path, code, entrypoint)
    with pytest.raises(ModelLoadError) as error:
        create_runtime(folder, config).load()
    assert fragment in str(error.value) and "plain def" in str(error.value)


def test_python_module_name_clash(tmp_path: Path) -> None:
    (tmp_path / "json.py").write_text("def predict(inputs):\n    return {}\n")
    (tmp_path / "serving.yaml").write_text(SIGNATURE.replace("entrypoint: model:Model", "entrypoint: json:predict"))
    with pytest.raises(ModelLoadError, match="'json' has the name of a module already in use"):
        create_runtime(tmp_path, load_serving_config(tmp_path)).load()


# -- REST app without sockets ----------------------------------------------------------------------------------


async def _client(plane: DataPlane, max_body_bytes: int = 2**20) -> httpx.AsyncClient:
    app = create_app(plane, server_version="test", max_body_bytes=max_body_bytes)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://runtime")


async def test_rest_not_ready_is_503() -> None:
    plane = DataPlane(FakeRuntime(), name="m", version=2)
    async with await _client(plane) as client:
        assert (await client.get("/v2/health/live")).status_code == 200
        for response in (
            await client.get("/v2/health/ready"),
            await client.get("/v2/models/m/ready"),
            await client.post("/v2/models/m/infer", json={"inputs": []}),
        ):
            assert response.status_code == 503 and "not ready" in response.json()["error"]


async def test_rest_body_limits() -> None:
    plane = await _loaded()
    async with await _client(plane, max_body_bytes=1000) as client:
        big = await client.post("/v2/models/m/infer", content=b" " * 2000)
        assert big.status_code == 413 and "limit" in big.json()["error"]
        bomb = gzip.compress(b" " * 10_000)
        inflated = await client.post("/v2/models/m/infer", content=bomb, headers={"content-encoding": "gzip"})
        assert inflated.status_code == 413
        garbage = await client.post("/v2/models/m/infer", content=b"xx", headers={"content-encoding": "gzip"})
        assert garbage.status_code == 400 and "gzip" in garbage.json()["error"]
        odd = await client.post("/v2/models/m/infer", content=b"{}", headers={"content-encoding": "br"})
        assert odd.status_code == 400 and "br" in odd.json()["error"]


async def test_rest_infer_in_process() -> None:
    plane = await _loaded()
    body = {
        "inputs": [
            {"name": "a", "shape": [1, 2], "datatype": "FP32", "data": [[1, 2]]},
            {"name": "b", "shape": [1], "datatype": "INT64", "data": [5]},
        ]
    }
    async with await _client(plane) as client:
        response = await client.post("/v2/models/m/versions/2/infer", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["outputs"][0] == {"name": "sum", "datatype": "FP32", "shape": [1], "data": [8.0]}
        assert (await client.get("/docs")).status_code == 404
        assert (await client.get("/v2/models/m/infer?version=3")).status_code == 405


TEXT_SIGNATURE = """
runtime: python
entrypoint: model:Model
signature:
  inputs: [{name: t, datatype: BYTES, shape: [-1]}]
  outputs: [{name: n, datatype: INT64, shape: [-1]}]
"""


class TextLengths(ModelRuntime):
    kind: ClassVar[str] = "python"

    def __init__(self) -> None:
        super().__init__(Path("."), parse_serving_config(TEXT_SIGNATURE))

    def load(self) -> None:
        return None

    def predict(self, inputs: dict[str, np.ndarray]) -> Mapping[str, Any]:
        return {"n": [len(b) for b in inputs["t"]]}


async def test_raw_bytes_data_is_split_no_further_than_the_shape_needs() -> None:
    # Every 4 bytes of raw BYTES data can be one (empty) element: 4 MiB declared as shape [1] was split into a
    # million Python objects before the count was compared with the shape; at the 64 MiB message limit, ~8 s of
    # CPU and ~400 MB for one request, on the event loop when the model is cheap.
    plane = DataPlane(TextLengths(), name="m", version=1)
    await plane.load()
    words = RawData(struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0))
    assert plane.validate([RequestInput("t", "BYTES", (2,), words)])["t"].tolist() == [b"ab", b""]
    padding = b"\0\0\0\0" * 2**20
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInput, match=r"input 't'.*more than the 1 element"):
            plane.validate([RequestInput("t", "BYTES", (1,), RawData(padding))])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"{peak} bytes allocated to refuse the request"
    plane.shutdown_executor()
