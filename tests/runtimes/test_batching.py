"""Adaptive batching: in process (DataPlane + Batcher), through the REST app, and in a real runtime process."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from manager_api.deployer.replica import _batching_flags
from manager_api.ports import free_port
from manager_api.processes import ChildProcess, http_ok, wait_until
from protos.topology.policies import BatchingPolicy, Policies
from runtimes.base import ModelRuntime
from runtimes.batching import BatchingOptions, request_rows, unbatchable_reason
from runtimes.dataplane import DataPlane, array_inputs
from runtimes.errors import InvalidInput, PredictError
from runtimes.messages import InferRequest, RequestedOutput
from runtimes.rest import create_app
from runtimes.rest_fast import with_fast_infer
from runtimes.serving_config import parse_serving_config

ROOT = Path(__file__).resolve().parents[2]

BATCHABLE = """
runtime: python
entrypoint: model:Model
signature:
  inputs: [{name: x, datatype: FP32, shape: [-1, 3]}]
  outputs:
    - {name: y, datatype: FP32, shape: [-1, 3]}
    - {name: total, datatype: FP64, shape: [-1]}
"""


class Doubler(ModelRuntime):
    """Doubles its rows, refuses negative values, and remembers the batch sizes it saw."""

    kind: ClassVar[str] = "python"

    def __init__(self, signature: str = BATCHABLE) -> None:
        super().__init__(Path("."), parse_serving_config(signature))
        self.batches: list[int] = []
        self._lock = threading.Lock()

    def load(self) -> None:
        """Nothing to load."""

    def predict(self, inputs: dict[str, np.ndarray]) -> Mapping[str, Any]:
        """``y = 2x``, ``total`` = row sums; ValueError on any negative value."""
        x = inputs["x"]
        with self._lock:
            self.batches.append(x.shape[0])
        if (x < 0).any():
            raise ValueError("negative values are not allowed")
        return {"y": x * 2, "total": x.sum(axis=1)}


def _request(rows: np.ndarray) -> InferRequest:
    return InferRequest("m", "", array_inputs({"x": rows}, Doubler().config.signature))


async def _plane(max_batch_size: int = 64, max_delay_ms: float = 20.0) -> tuple[DataPlane, Doubler]:
    runtime = Doubler()
    plane = DataPlane(runtime, name="m", version=1, batching=BatchingOptions(max_batch_size, max_delay_ms))
    await plane.load()
    runtime.batches.clear()  # forget the warm-up call
    return plane, runtime


def _rows(index: int, count: int) -> np.ndarray:
    # Every caller's rows are distinct, so a mixed-up split shows.
    return np.arange(count * 3, dtype=np.float32).reshape(count, 3) + 1000 * index


async def test_each_caller_gets_its_own_rows_back() -> None:
    plane, runtime = await _plane(max_batch_size=32, max_delay_ms=20)
    inputs = [_rows(i, 1 + i % 3) for i in range(60)]
    responses = await asyncio.gather(*(plane.infer(_request(rows)) for rows in inputs))
    for rows, response in zip(inputs, responses, strict=True):
        outputs = {o.name: o.data for o in response.outputs}
        np.testing.assert_array_equal(outputs["y"], rows * 2)
        np.testing.assert_array_equal(outputs["total"], rows.sum(axis=1))
    assert sum(runtime.batches) == sum(len(rows) for rows in inputs)
    # Concurrent callers really shared predict calls, and no batch grew past its limit.
    assert len(runtime.batches) < len(inputs) / 4
    assert max(runtime.batches) <= 32


async def test_requested_outputs_are_per_caller() -> None:
    plane, _ = await _plane()
    only_total = InferRequest("m", "", _request(_rows(1, 2)).inputs, outputs=[RequestedOutput("total")])
    both, total = await asyncio.gather(plane.infer(_request(_rows(0, 1))), plane.infer(only_total))
    assert [o.name for o in both.outputs] == ["y", "total"]
    assert [o.name for o in total.outputs] == ["total"]
    np.testing.assert_array_equal(total.outputs[0].data, _rows(1, 2).sum(axis=1))


async def test_max_delay_is_respected() -> None:
    plane, runtime = await _plane(max_batch_size=1000, max_delay_ms=50)
    started = time.monotonic()
    await plane.infer(_request(_rows(0, 1)))
    waited = time.monotonic() - started
    # A lone request waits for company for the whole delay, and not much longer (a busy test machine adds some).
    assert 0.045 <= waited < 1.0
    assert runtime.batches == [1]
    queue = plane.metrics.get_sample_value("hydro_runtime_batch_queue_seconds_sum", {"model": "m", "version": "1"})
    assert queue is not None and 0.045 <= queue < 1.0


async def test_a_full_batch_does_not_wait_for_the_delay() -> None:
    plane, runtime = await _plane(max_batch_size=4, max_delay_ms=10_000)
    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(plane.infer(_request(_rows(i, 1))) for i in range(8))), 5)
    assert time.monotonic() - started < 5
    assert runtime.batches == [4, 4]


async def test_a_request_larger_than_a_batch_runs_alone_at_once() -> None:
    plane, runtime = await _plane(max_batch_size=4, max_delay_ms=10_000)
    response = await asyncio.wait_for(plane.infer(_request(_rows(0, 9))), 5)
    np.testing.assert_array_equal(response.outputs[0].data, _rows(0, 9) * 2)
    assert runtime.batches == [9]


async def test_a_malformed_request_fails_only_itself() -> None:
    plane, runtime = await _plane(max_batch_size=64, max_delay_ms=30)
    bad = InferRequest("m", "", array_inputs({"x": np.zeros((1, 4), dtype=np.float32)}, runtime.config.signature))
    good = [_rows(i, 2) for i in range(5)]
    results = await asyncio.gather(
        *(plane.infer(_request(rows)) for rows in good), plane.infer(bad), return_exceptions=True
    )
    assert isinstance(results[-1], InvalidInput) and "'x'" in str(results[-1])
    for rows, response in zip(good, results[:-1], strict=True):
        assert not isinstance(response, BaseException)
        np.testing.assert_array_equal(response.outputs[0].data, rows * 2)
    # The malformed request never reached the model: the five good ones made one batch.
    assert runtime.batches == [10]


async def test_data_that_makes_the_model_fail_fails_only_its_request() -> None:
    plane, runtime = await _plane(max_batch_size=64, max_delay_ms=30)
    good = [_rows(i, 1) for i in range(4)]
    poison = -_rows(9, 2)
    results = await asyncio.gather(
        *(plane.infer(_request(rows)) for rows in good), plane.infer(_request(poison)), return_exceptions=True
    )
    assert isinstance(results[-1], PredictError) and "negative values" in str(results[-1])
    for rows, response in zip(good, results[:-1], strict=True):
        assert not isinstance(response, BaseException)
        np.testing.assert_array_equal(response.outputs[0].data, rows * 2)
    # One failed batch of everything, then each request on its own.
    assert runtime.batches[0] == 6 and sorted(runtime.batches[1:]) == [1, 1, 1, 1, 2]
    fallbacks = plane.metrics.get_sample_value("hydro_runtime_batch_fallbacks_total", {"model": "m", "version": "1"})
    assert fallbacks == 1
    # And the batcher keeps working afterwards.
    again = await plane.infer(_request(_rows(1, 1)))
    np.testing.assert_array_equal(again.outputs[0].data, _rows(1, 1) * 2)


def test_batchable_signatures() -> None:
    assert unbatchable_reason(Doubler().config.signature) is None
    fixed = BATCHABLE.replace("shape: [-1, 3]}]", "shape: [2, 3]}]", 1)
    reason = unbatchable_reason(parse_serving_config(fixed).signature)
    assert reason is not None and "'x'" in reason and "first dimension" in reason
    ragged = BATCHABLE.replace("shape: [-1, 3]}]", "shape: [-1, -1]}]", 1)
    reason = unbatchable_reason(parse_serving_config(ragged).signature)
    assert reason is not None and "after the first" in reason
    assert request_rows({"a": np.zeros((2, 3)), "b": np.zeros(2)}) == 2
    assert request_rows({"a": np.zeros((2, 3)), "b": np.zeros(3)}) is None


async def test_unbatchable_model_serves_without_batching() -> None:
    runtime = Doubler(BATCHABLE.replace("shape: [-1, 3]}]", "shape: [2, 3]}]", 1))
    plane = DataPlane(runtime, name="m", version=1, batching=BatchingOptions(8, 1))
    assert plane.batcher is None
    await plane.load()
    response = await plane.infer(_request(_rows(0, 2)))
    np.testing.assert_array_equal(response.outputs[0].data, _rows(0, 2) * 2)


def test_batching_options_and_policy_validation() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchingOptions(1, 2)
    with pytest.raises(ValueError, match="max_delay_ms"):
        BatchingOptions(8, -1)
    policy = Policies.model_validate({"batching": {"max_batch_size": 32, "max_delay_ms": 5}}).batching
    assert policy == BatchingPolicy(max_batch_size=32, max_delay_ms=5)
    assert Policies().batching is None
    # Each bad policy is refused for its own field (not, say, for a field that became required).
    refused = {"max_batch_size": {"max_batch_size": 1}, "max_delay_ms": {"max_batch_size": 8, "max_delay_ms": -1}}
    for field, bad in {**refused, "x": {"max_batch_size": 8, "x": 1}}.items():
        with pytest.raises(ValidationError) as error:
            Policies.model_validate({"batching": bad})
        assert [e["loc"] for e in error.value.errors()] == [("batching", field)], error.value
    assert _batching_flags(None) == []
    assert _batching_flags(policy) == ["--max-batch-size", "32", "--max-batch-delay-ms", "5.0"]


async def test_metrics_endpoint_and_fast_path() -> None:
    plane, _ = await _plane(max_batch_size=8, max_delay_ms=5)
    app = create_app(plane, server_version="test")
    body = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    # The fast path (what the runtime process serves) and the FastAPI route answer alike.
    for asgi in (app, with_fast_infer(app, plane, max_body_bytes=2**20)):
        transport = httpx.ASGITransport(app=asgi)
        async with httpx.AsyncClient(transport=transport, base_url="http://runtime") as client:
            answers = await asyncio.gather(*(client.post("/v2/models/m/infer", json=body) for _ in range(8)))
            for answer in answers:
                assert answer.status_code == 200, answer.text
                assert answer.json()["outputs"][0]["data"] == [2, 4, 6]
            missing = await client.post("/v2/models/other/infer", json=body)
            assert missing.status_code == 404 and "other" in missing.json()["error"]
            bad = await client.post("/v2/models/m/versions/1/infer", content=b"{")
            assert bad.status_code == 400 and "JSON" in bad.json()["error"]
            metrics = await client.get("/metrics")
            assert metrics.status_code == 200
            assert 'hydro_runtime_batch_size_count{model="m",version="1"}' in metrics.text


# -- a real runtime process ------------------------------------------------------------------------------------

PROCESS_MODEL = """
import time


def predict(inputs):
    # A fixed per-call cost: what batching amortizes.
    time.sleep(0.02)
    return {"y": inputs["x"] * 2, "total": inputs["x"].sum(axis=1)}
"""


@pytest.fixture
def batched_runtime(tmp_path: Path) -> Iterator[str]:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.py").write_text(PROCESS_MODEL)
    (model_dir / "serving.yaml").write_text(
        BATCHABLE.replace("entrypoint: model:Model", "files: [model.py]\nentrypoint: model:predict")
    )
    grpc_port, http_port = free_port(), free_port()
    argv = [
        sys.executable,
        "-m",
        "runtimes",
        "--model-dir",
        str(model_dir),
        "--name",
        "m",
        "--version",
        "1",
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        str(http_port),
        "--max-batch-size",
        "16",
        "--max-batch-delay-ms",
        "5",
    ]
    process = ChildProcess("batched", argv, cwd=ROOT, env=dict(os.environ), log_path=tmp_path / "runtime.log")
    process.start()
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_until(lambda: not process.running or http_ok(f"{url}/v2/health/ready"), 30, "batched runtime ready")
        assert process.running, (tmp_path / "runtime.log").read_text()
        yield url
    finally:
        process.stop(grace=10)


def test_runtime_process_batches_concurrent_requests(batched_runtime: str) -> None:
    def call(index: int) -> list[float]:
        body = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [index, index, index]}]}
        response = httpx.post(f"{batched_runtime}/v2/models/m/infer", json=body, timeout=20)
        assert response.status_code == 200, response.text
        outputs: list[dict[str, Any]] = response.json()["outputs"]
        return [float(v) for v in next(o for o in outputs if o["name"] == "y")["data"]]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(48)))
    assert results == [[2 * i] * 3 for i in range(48)]
    metrics = httpx.get(f"{batched_runtime}/metrics").text
    samples = {
        line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines() if line.startswith("hydro_")
    }
    calls = samples['hydro_runtime_batch_size_count{model="m",version="1"}']
    rows = samples['hydro_runtime_batch_size_sum{model="m",version="1"}']
    assert rows == 48 and calls < 48  # 16 concurrent callers of a 20 ms model: batches formed


async def test_statistics_count_the_wait_for_a_batch_as_queue_time() -> None:
    # Triton's (and docs/runtimes.md's) queue time includes waiting for a batch; it was added to compute_infer,
    # so a 50 ms batching delay looked like a 50 ms model.
    plane, _ = await _plane(max_batch_size=1000, max_delay_ms=50)
    await plane.infer(_request(_rows(0, 1)))
    stages = plane.statistics.snapshot().stages
    assert stages["queue"].count == 1 and stages["queue"].ns >= 45_000_000
    assert stages["compute_infer"].count == 1 and stages["compute_infer"].ns < 45_000_000


async def test_statistics_count_each_row_of_a_batched_request_as_an_inference() -> None:
    # Triton's inference_count with batching on: a request of batch size 3 is 3 inferences; execution_count counts
    # the model's executions (batches), and success the requests.
    plane, _ = await _plane(max_batch_size=64, max_delay_ms=20)
    await asyncio.gather(plane.infer(_request(_rows(0, 3))), plane.infer(_request(_rows(1, 2))))
    await plane.infer(_request(_rows(2, 1)))
    snapshot = plane.statistics.snapshot()
    assert snapshot.inference_count == 6
    assert snapshot.stages["success"].count == 3
    assert snapshot.execution_count == sum(stages["compute_infer"].count for stages in snapshot.batches.values())
    assert snapshot.execution_count < 3  # the two concurrent requests shared one execution
