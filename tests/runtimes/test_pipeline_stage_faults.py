"""What a pipeline runtime does with faults a real stage cannot make and with bad requests at its REST front-end.

The pipeline runtime is the real process (`python -m runtimes.pipeline`, traced to an in-process OTLP receiver, with
its shadow worker); its ``--outbound`` address is a gRPC server in this process that stands in for the sidecar's
outbound listener and the stages behind it. A stand-in is needed because the faults tested here cannot come from a
real model runtime: its answers are encoded from the model's arrays, so their raw bytes always match their shape.
The stand-in records the metadata of every call it gets, which a real stage would not tell.

Application ``faults``: stage 1 ``first:1`` (``x`` FP32 [-1] -> ``mid``), shadowed by ``first:2``; stage 2
``last:1`` (``mid`` -> ``y`` FP32 [-1] and ``label`` BYTES [-1]). The first element of ``x`` picks a fault
(FAULTS); any other value gets right answers (``mid = x``, ``y = 2 * mid``, ``label = b"ok"`` per element).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from aio_server_thread import AioServerThread
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2, service_pb2_grpc

from manager_api.ports import free_port
from manager_api.processes import ChildProcess, http_ok, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tracing"))
# tests/tracing is on the path only when a test there is collected.
from otlp_receiver import OtlpReceiver

APP = "faults"
SHADOW = "first:2"
#: First value of ``x`` -> what the stand-in answers instead of the right answer.
FAULTS = {
    1001.0: "last stage: y FP32 [3] with 8 raw bytes",
    1002.0: "last stage: y FP32 [3] with 7 raw bytes",
    1003.0: "last stage: label BYTES [3] with 2 elements",
    1004.0: "last stage: label BYTES [3] cut off in a length prefix",
    1005.0: "first stage: mid FP32 [3] with 8 raw bytes",
    1006.0: "last stage: y FP32 [3] with 2 typed contents",
    1007.0: "last stage: label BYTES [3] with 200,000 raw elements",
    1008.0: "last stage: label BYTES [3] with 200,000 typed contents",
    1009.0: "first stage: no answer until the call is cancelled",
    1010.0: "last stage: an answer over the pipeline's 1 MiB message limit",
}
#: How many (empty) BYTES elements the 200,000-element faults carry: 800 KB raw, under the 1 MiB message limit.
MANY = 200_000


def _bytes_raw(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


@dataclass
class Call:
    """One call the stand-in got: the stage (``faults/1``) or shadow (``first/2``) it was for, and its ids."""

    target: str
    request_id: str  # the OIP request id (the body's "id")
    x_request_id: str | None  # the x-request-id metadata
    traced: bool  # whether it came with a traceparent


@dataclass
class StandInOutbound:
    """inference.GRPCInferenceService on a grpc.aio server on a loop of its own thread."""

    calls: list[Call] = field(default_factory=list)
    #: request id -> seconds the call still had before its deadline when it was cancelled (fault 1009).
    cancelled: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0

    def __post_init__(self) -> None:
        self._serving = AioServerThread("stand-in-outbound")

    def start(self) -> StandInOutbound:
        self.port = self._serving.start(self._bind)
        return self

    def _bind(self, server: grpc.aio.Server) -> int:
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_Stages(self), server)
        return server.add_insecure_port("127.0.0.1:0")

    def stop(self) -> None:
        self._serving.stop()

    def calls_of(self, request_id: str) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.request_id == request_id]


class _Stages(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, outbound: StandInOutbound) -> None:
        self.outbound = outbound

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        metadata = {key: value for key, value in context.invocation_metadata() or ()}
        target = metadata.get("x-hydro-stage") or metadata.get("x-hydro-model-version", "?")
        with self.outbound.lock:
            self.outbound.calls.append(
                Call(target, request.id, metadata.get("x-request-id"), "traceparent" in metadata)
            )
        values = np.frombuffer(request.raw_input_contents[0], dtype="<f4")
        fault = FAULTS.get(float(values[0]), "") if values.size else ""
        if fault.endswith("until the call is cancelled") and target == f"{APP}/1":
            try:
                await asyncio.Event().wait()  # never set: only the cancellation ends it
            except asyncio.CancelledError:
                with self.outbound.lock:
                    self.outbound.cancelled[request.id] = context.time_remaining() or 0.0
                raise
        if target in (f"{APP}/1", "first/2"):
            model, _, version = ("first:1" if target == f"{APP}/1" else SHADOW).partition(":")
            response = service_pb2.ModelInferResponse(model_name=model, model_version=version, id=request.id)
            response.outputs.add(name="mid", datatype="FP32", shape=[3] if fault.startswith("first") else [values.size])
            response.raw_output_contents.append(values.tobytes()[:8] if fault.startswith("first") else values.tobytes())
            return response
        response = service_pb2.ModelInferResponse(model_name="last", model_version="1", id=request.id)
        y = (values * 2).astype("<f4")
        labels = [b"ok"] * values.size
        if fault.endswith("typed contents"):
            y_values = [1.0, 2.0] if "2 typed" in fault else [1.0, 2.0, 3.0]
            response.outputs.add(name="y", datatype="FP32", shape=[3]).contents.fp32_contents.extend(y_values)
            label_values = [b""] * MANY if "200,000" in fault else labels
            response.outputs.add(name="label", datatype="BYTES", shape=[3]).contents.bytes_contents.extend(label_values)
            return response
        y_shape, y_raw = [values.size], y.tobytes()
        if "message limit" in fault:
            y_shape, y_raw = [300_000], np.zeros(300_000, dtype="<f4").tobytes()  # 1.2 MB
        label_shape, label_raw = [values.size], _bytes_raw(labels)
        if "8 raw bytes" in fault:
            y_shape, y_raw = [3], y.tobytes()[:8]
        elif "7 raw bytes" in fault:
            y_shape, y_raw = [3], y.tobytes()[:7]
        elif "2 elements" in fault:
            label_shape, label_raw = [3], _bytes_raw(labels[:2])
        elif "200,000 raw" in fault:
            label_shape, label_raw = [3], _bytes_raw([b""] * MANY)
        elif "length prefix" in fault:
            label_shape, label_raw = [3], _bytes_raw(labels[:2]) + b"\x02\x00"
        response.outputs.add(name="y", datatype="FP32", shape=y_shape)
        response.outputs.add(name="label", datatype="BYTES", shape=label_shape)
        response.raw_output_contents.extend([y_raw, label_raw])
        return response


def _spec() -> dict[str, Any]:
    def tensor(name: str, datatype: str = "FP32") -> dict[str, Any]:
        return {"name": name, "datatype": datatype, "shape": [-1]}

    first = {"inputs": [tensor("x")], "outputs": [tensor("mid")]}
    last = {"inputs": [tensor("mid")], "outputs": [tensor("y"), tensor("label", "BYTES")]}
    application = {
        "name": APP,
        "stages": [
            {
                "variants": [{"model": "first", "version": 1, "weight": 100}],
                "shadows": [{"model": "first", "version": 2}],
            },
            {"variants": [{"model": "last", "version": 1, "weight": 100}]},
        ],
    }
    return {"application": application, "signatures": {"first:1": first, SHADOW: first, "last:1": last}}


@dataclass
class Pipeline:
    url: str
    grpc_port: int
    outbound: StandInOutbound
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def infer(self, x: list[float], request_id: str = "", headers: dict[str, Any] | None = None) -> httpx.Response:
        body = {"id": request_id, "inputs": [{"name": "x", "datatype": "FP32", "shape": [len(x)], "data": x}]}
        return httpx.post(f"{self.url}/v2/models/{APP}/infer", json=body, headers=headers, timeout=10)

    def shadow_metric(self, name: str, **labels: str) -> float:
        """A sample of the shadow's series in the runtime's /metrics (0 before it has one)."""
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        wanted = {"app": APP, "stage": "1", "shadow": SHADOW, **labels}
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and sample.labels == wanted
        )

    def shadow_calls(self, outcome: str) -> float:
        return self.shadow_metric("hydro_shadow_calls_total", outcome=outcome)

    def wait_shadow_settled(self) -> None:
        """Until no copy is in flight: the counts then move only with the next request."""
        wait_until(lambda: self.shadow_metric("hydro_shadow_in_flight") == 0, 20, "no shadow copy in flight")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    work = tmp_path_factory.mktemp("pipeline-faults")
    spec = work / "spec.json"
    spec.write_text(json.dumps(_spec()))
    receiver = OtlpReceiver()
    outbound = StandInOutbound()
    process: ChildProcess | None = None
    try:
        receiver.start()
        outbound.start()
        # Traced (the request id goes into stage calls only then), to the receiver only; export every 200 ms.
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.update(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_BSP_SCHEDULE_DELAY="200")
        http_port, grpc_port = free_port(), free_port()
        process = ChildProcess(
            "pipeline",
            [
                *(sys.executable, "-m", "runtimes.pipeline", "--spec", str(spec)),
                *("--outbound", f"127.0.0.1:{outbound.port}"),
                *("--grpc-port", str(grpc_port), "--http-port", str(http_port)),
                # 1 MiB: the body limit the oversized-body tests go over.
                *("--max-message-mb", "1", "--timeout", "5", "--shadow-timeout", "5"),
            ],
            env=env,
            log_path=work / "pipeline.log",
        ).start()
        url = f"http://127.0.0.1:{http_port}"
        process.wait_ready(lambda: http_ok(f"{url}/v2/health/ready"), 60)
        started = Pipeline(url, grpc_port, outbound, work / "pipeline.log")

        # Ready means the shadow worker served or exited: the tests start once a copy was reported, so that none
        # depends on the worker's start (runtimes/__init__ keeps it from dying at the fork, test_shadow_spawn.py).
        def shadow_serves() -> bool:
            assert started.infer([1.0], "warm-up").status_code == 200
            return started.shadow_calls("agree") > 0

        wait_until(shadow_serves, 30, "a shadow copy reported", interval=0.5)
        started.wait_shadow_settled()
        yield started
    finally:
        if process is not None:
            process.stop()
            print(process.log_tail(40))
        outbound.stop()
        receiver.stop()


def _wait_for_calls(pipeline: Pipeline, request_id: str, count: int) -> list[Call]:
    wait_until(lambda: len(pipeline.outbound.calls_of(request_id)) >= count, 20, f"{count} calls of {request_id}")
    return pipeline.outbound.calls_of(request_id)


def test_a_right_answer_passes_its_request_id_to_every_stage_and_shadow(pipeline: Pipeline) -> None:
    pipeline.wait_shadow_settled()
    before = pipeline.shadow_calls("agree")
    response = pipeline.infer([1.0, 2.0, 3.0], "plain", headers={"x-request-id": "req-1.a_b"})
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
    assert outputs == {"y": [2.0, 4.0, 6.0], "label": ["ok", "ok", "ok"]}
    calls = _wait_for_calls(pipeline, "plain", 3)
    assert sorted(c.target for c in calls) == [f"{APP}/1", f"{APP}/2", "first/2"]
    assert {c.x_request_id for c in calls} == {"req-1.a_b"}
    wait_until(lambda: pipeline.shadow_calls("agree") == before + 1, 20, "the shadow's agreement reported")


@pytest.mark.parametrize(
    "request_id",
    ["caf\u00e9".encode(), b"caf\xe9", b"tab\there", "\u4e2d".encode()],
    ids=["utf-8", "latin-1", "tab", "cjk"],
)
def test_a_request_id_that_is_no_grpc_metadata_value_is_not_passed_on(pipeline: Pipeline, request_id: bytes) -> None:
    """Starlette decodes header bytes as latin-1; gRPC takes printable ASCII only, and refused the call outright."""
    pipeline.wait_shadow_settled()
    before = pipeline.shadow_calls("agree"), pipeline.shadow_calls("error")
    oip_id = f"bad-{request_id.hex()}"
    response = pipeline.infer([1.0, 2.0], oip_id, headers={"x-request-id": request_id})
    assert response.status_code == 200, response.text
    assert {o["name"]: o["data"] for o in response.json()["outputs"]}["y"] == [2.0, 4.0]
    calls = _wait_for_calls(pipeline, oip_id, 3)
    assert sorted(c.target for c in calls) == [f"{APP}/1", f"{APP}/2", "first/2"]
    # Dropped, not mangled (the sidecar gives the stage calls an id of its own); still traced.
    assert {c.x_request_id for c in calls} == {None}
    assert all(c.traced for c in calls), calls
    # The shadow's copy is made and agrees: the request id is no fault of the shadow variant.
    wait_until(lambda: pipeline.shadow_calls("agree") == before[0] + 1, 20, "the shadow's agreement reported")
    assert pipeline.shadow_calls("error") == before[1]


@pytest.mark.parametrize(
    ("first", "stage", "message"),
    [
        (1001.0, "stage 2 (last:1)", "output 'y' has 8 bytes of raw data, but FP32 [3] needs 12"),
        (1002.0, "stage 2 (last:1)", "output 'y' has 7 bytes of raw data, but FP32 [3] needs 12"),
        (1003.0, "stage 2 (last:1)", "output 'label' has 2 BYTES elements, but shape [3] needs 3"),
        (1004.0, "stage 2 (last:1)", "output 'label': raw BYTES data is cut off"),
        (1005.0, "stage 1 (first:1)", "output 'mid' has 8 bytes of raw data, but FP32 [3] needs 12"),
        (1006.0, "stage 2 (last:1)", "output 'y' has 8 bytes of raw data, but FP32 [3] needs 12"),
        # Refused at the fourth element, not walked to the 200,000th (the message would count them).
        (1007.0, "stage 2 (last:1)", "output 'label': the raw BYTES data holds more than the 3 elements its shape"),
        # Refused by the field's length, before 200,000 elements are decoded and re-encoded.
        (1008.0, "stage 2 (last:1)", "output 'label' has 200000 values in contents.bytes_contents, but shape [3]"),
    ],
    ids=["8-bytes", "7-bytes", "bytes-count", "bytes-cut", "first-stage", "typed", "bytes-many", "typed-many"],
)
def test_a_stage_answer_whose_data_does_not_fit_its_shape_is_that_stages_fault(
    pipeline: Pipeline, first: float, stage: str, message: str
) -> None:
    response = pipeline.infer([first, 2.0, 3.0])
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert f"{stage} of application 'faults' answered an unreadable response" in error, error
    assert message in error, error
    assert "input 'x'" not in error and "internal error" not in error, error
    # Over gRPC too (raw outputs: the last stage's bytes would otherwise go back to the caller unchecked).
    request = service_pb2.ModelInferRequest(model_name=APP)
    request.inputs.add(name="x", datatype="FP32", shape=[3])
    request.raw_input_contents.append(np.array([first, 2.0, 3.0], dtype="<f4").tobytes())
    with grpc.insecure_channel(f"127.0.0.1:{pipeline.grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as raised:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert stage in (raised.value.details() or ""), raised.value.details()


def _body(values: int) -> bytes:
    data = [1.0] * values
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [values], "data": data}]}).encode()


def test_a_gzip_or_deflate_body_is_answered(pipeline: Pipeline) -> None:
    url = f"{pipeline.url}/v2/models/{APP}/infer"
    for encoding, compressed in (("gzip", gzip.compress(_body(3))), ("deflate", zlib.compress(_body(3)))):
        response = httpx.post(url, content=compressed, headers={"content-encoding": encoding}, timeout=10)
        assert response.status_code == 200, (encoding, response.text)
        assert {o["name"]: o["data"] for o in response.json()["outputs"]}["y"] == [2.0, 2.0, 2.0]
    unknown = httpx.post(url, content=_body(3), headers={"content-encoding": "br"}, timeout=10)
    assert unknown.status_code == 400
    assert "unsupported Content-Encoding 'br'" in unknown.json()["error"]
    broken = httpx.post(url, content=b"not gzip", headers={"content-encoding": "gzip"}, timeout=10)
    assert broken.status_code == 400
    assert "not valid gzip data" in broken.json()["error"]
    # Cut before the gzip trailer (all the JSON inflates), and a whole stream followed by other bytes.
    whole = gzip.compress(_body(3))
    cut = httpx.post(url, content=whole[:-4], headers={"content-encoding": "gzip"}, timeout=10)
    assert cut.status_code == 400, cut.text
    assert "the request body is cut short: the gzip stream ends before its end marker" in cut.json()["error"]
    trailing = httpx.post(url, content=whole + b"\0\0", headers={"content-encoding": "gzip"}, timeout=10)
    assert trailing.status_code == 400, trailing.text
    assert "the request body has 2 bytes after the end of its gzip stream" in trailing.json()["error"]


def test_a_body_over_the_limit_is_refused_with_413(pipeline: Pipeline) -> None:
    url = f"{pipeline.url}/v2/models/{APP}/infer"
    big = _body(250_000)  # 1.25 MB of JSON, over --max-message-mb 1
    assert len(big) > 2**20
    declared = httpx.post(url, content=big, timeout=10)
    assert declared.status_code == 413
    assert "larger than the 1 MiB limit" in declared.json()["error"]

    # Chunked: no length to check first, the body is cut off while it streams in.
    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    streamed = httpx.post(url, content=chunks(), timeout=10)
    assert streamed.status_code == 413
    assert "the request body is larger than the 1 MiB limit" in streamed.json()["error"]
    # A small gzip body that inflates past the limit.
    bomb = httpx.post(url, content=gzip.compress(big), headers={"content-encoding": "gzip"}, timeout=10)
    assert bomb.status_code == 413
    assert "the decompressed request body is larger than the 1 MiB limit" in bomb.json()["error"]


def test_stage_answers_of_every_datatype_are_size_checked_and_a_refused_call_names_its_stage(
    tmp_path: Path,
) -> None:
    """response_outputs and PipelineExecutor directly, in a process of their own (pipeline_wire_check.py)."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(_spec()))
    script = Path(__file__).with_name("pipeline_wire_check.py")
    done = subprocess.run([sys.executable, str(script), str(spec)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.splitlines()[-1])

    for case, outcomes in found["sizes"].items():
        assert outcomes["exact"] == "accepted", (case, outcomes)
        if not case.endswith(("[0]", "[1, 0, 4]")):  # no elements, no bytes: none to take away
            assert outcomes["short"].startswith("PredictError: output 'out'"), (case, outcomes)
        assert outcomes["long"].startswith("PredictError: output 'out'"), (case, outcomes)
    assert found["sizes"]["FP16 [2, 3]"]["short"] == (
        "PredictError: output 'out' has 11 bytes of raw data, but FP16 [2, 3] needs 12"
    )
    assert found["sizes"]["BOOL []"]["long"] == (
        "PredictError: output 'out' has 2 bytes of raw data, but BOOL [] needs 1"
    )
    assert found["sizes"]["BYTES [2, 3]"]["long"] == (
        "PredictError: output 'out': raw BYTES data is cut off in a length prefix"
    )

    assert found["bytes_overrun"] == "PredictError: output 'out': raw BYTES data is cut off in its last element"

    # grpc refuses a call with metadata it does not take by raising its own ExecuteBatchError (no AioRpcError).
    refused = found["refused_call"]
    assert refused["type"] == "StageError", refused
    assert (refused["grpc_code"], refused["http_status"]) == ("INTERNAL", 500)
    assert refused["message"].startswith(
        "stage 1 (first:1) of application 'faults' could not be called: ExecuteBatchError"
    ), refused


def _grpc_request(x: list[float], request_id: str = "") -> Any:
    request = service_pb2.ModelInferRequest(model_name=APP, id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=[len(x)])
    request.raw_input_contents.append(np.array(x, dtype="<f4").tobytes())
    return request


def _assert_stage_call_cancelled(pipeline: Pipeline, request_id: str) -> None:
    """The stand-in saw the stage call cancelled by the pipeline, long before the stage's own deadline ran out."""
    wait_until(lambda: request_id in pipeline.outbound.cancelled, 10, f"the stage call of {request_id} cancelled")
    # The stage's share of --timeout 5 is 2.5 s: a call cancelled by its deadline would have ~0 left.
    assert pipeline.outbound.cancelled[request_id] > 1.0, pipeline.outbound.cancelled[request_id]


def test_a_grpc_caller_that_cancels_cancels_the_stage_call(pipeline: Pipeline) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{pipeline.grpc_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        future = stub.ModelInfer.future(_grpc_request([1009.0], "cancel-grpc"), timeout=30)
        _wait_for_calls(pipeline, "cancel-grpc", 1)
        future.cancel()
        _assert_stage_call_cancelled(pipeline, "cancel-grpc")
        # Nothing left behind: the next request is answered.
        response = stub.ModelInfer(_grpc_request([1.0, 2.0]), timeout=10)
    assert np.frombuffer(response.raw_output_contents[0], dtype="<f4").tolist() == [2.0, 4.0]


def test_a_rest_caller_that_disconnects_cancels_the_stage_call(pipeline: Pipeline) -> None:
    body = json.dumps(
        {"id": "cancel-rest", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1009.0]}]}
    ).encode()
    head = (
        f"POST /v2/models/{APP}/infer HTTP/1.1\r\nHost: pipeline\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    port = int(pipeline.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(head + body)
        _wait_for_calls(pipeline, "cancel-rest", 1)
    _assert_stage_call_cancelled(pipeline, "cancel-rest")
    assert pipeline.infer([1.0], "after-cancel").status_code == 200
    wait_until(
        lambda: "the client disconnected before the pipeline answered" in pipeline.log(), 10, "the disconnect logged"
    )


def test_a_body_cut_off_by_the_client_is_logged_as_a_disconnect(pipeline: Pipeline) -> None:
    """Not as an ERROR with Starlette's ClientDisconnect traceback (a "failed" 500 for every aborted upload)."""
    start = len(pipeline.log())
    port = int(pipeline.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        head = f"POST /v2/models/{APP}/infer HTTP/1.1\r\nHost: pipeline\r\nContent-Length: 1000\r\n\r\n"
        client.sendall(head.encode() + b"{")
    marker = f"POST /v2/models/{APP}/infer: the client disconnected before sending its whole body"
    wait_until(lambda: marker in pipeline.log()[start:], 10, "the disconnect logged")
    log = pipeline.log()[start:]
    assert "ClientDisconnect" not in log and " failed" not in log, log
    assert pipeline.infer([1.0], "after-cut-body").status_code == 200


def _post_document(pipeline: Pipeline, document: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    return httpx.post(f"{pipeline.url}/v2/models/{APP}/infer", json=document, headers=headers, timeout=10)


X = {"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0]}

#: name -> (request document, what the 400's error says). None of them may reach a stage.
BAD_REQUESTS: dict[str, tuple[dict[str, Any], str]] = {
    "missing input": ({"inputs": []}, "missing input 'x'; application 'faults' expects: x (FP32 [-1])"),
    "wrong datatype": ({"inputs": [{**X, "datatype": "FP64"}]}, "input 'x' has datatype FP64, application"),
    "wrong rank": ({"inputs": [{**X, "shape": [1, 2]}]}, "input 'x' has shape [1, 2], application 'faults' expects"),
    "data not matching the shape": ({"inputs": [{**X, "shape": [3]}]}, "input 'x' has 2 data elements, but shape"),
    "input given twice": ({"inputs": [X, X]}, "input 'x' is given more than once"),
    "unknown output": (
        {"inputs": [X], "outputs": [{"name": "z"}]},
        "unknown output 'z' requested; application 'faults' has outputs: y, label",
    ),
    "classification asked of an output": (
        {"inputs": [X], "outputs": [{"name": "y", "parameters": {"classification": 2}}]},
        "output 'y': the classification extension is not supported",
    ),
    "output in a shared-memory region": (
        {"inputs": [X], "outputs": [{"name": "y", "parameters": {"shared_memory_region": "r"}}]},
        "output 'y': the shared-memory extension is not supported",
    ),
    "input in a shared-memory region, with data too": (
        {"inputs": [{**X, "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 8}}]},
        "input 'x': the shared-memory extension is not supported",
    ),
    "FP32 value past its range": ({"inputs": [{**X, "data": [1.0, 1e39]}]}, "value 1e+39 at position 1 is outside"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_bad_request_is_refused_before_any_stage(pipeline: Pipeline, case: str) -> None:
    document, fragment = BAD_REQUESTS[case]
    request_id = f"bad-{case}"
    response = _post_document(pipeline, {**document, "id": request_id})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert fragment in error and "stage" not in error, error
    assert pipeline.outbound.calls_of(request_id) == []


def test_raw_input_data_of_the_wrong_size_is_refused_before_any_stage(pipeline: Pipeline) -> None:
    """Over gRPC raw_input_contents and REST binary data: 7 bytes are no FP32 [2]; the pipeline says so itself."""
    request = _grpc_request([1.0, 2.0], "raw-short")
    request.raw_input_contents[0] = request.raw_input_contents[0][:7]
    with grpc.insecure_channel(f"127.0.0.1:{pipeline.grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as raised:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = raised.value.details() or ""
    assert "input 'x' has 7 bytes of raw data, but FP32 [2] needs 8" in details and "stage" not in details, details
    header = json.dumps(
        {"id": "binary-long", "inputs": [{**X, "data": None, "parameters": {"binary_data_size": 12}}]}
    ).encode()
    response = httpx.post(
        f"{pipeline.url}/v2/models/{APP}/infer",
        content=header + b"\0" * 12,
        headers={"Inference-Header-Content-Length": str(len(header))},
        timeout=10,
    )
    assert response.status_code == 400, response.text
    assert "input 'x' has 12 bytes of raw data, but FP32 [2] needs 8" in response.json()["error"], response.text
    assert pipeline.outbound.calls_of("raw-short") == pipeline.outbound.calls_of("binary-long") == []


def test_a_version_in_the_address_is_404_over_rest_and_grpc(pipeline: Pipeline) -> None:
    """Applications have no versions (Triton clients send model_version only when asked to)."""
    for method, path in (
        ("POST", "versions/1/infer"),
        ("GET", "versions/1"),
        ("GET", "versions/1/ready"),
        ("GET", "versions/2/config"),
    ):
        response = httpx.request(method, f"{pipeline.url}/v2/models/{APP}/{path}", json={}, timeout=10)
        assert response.status_code == 404, (path, response.text)
        assert "application 'faults' has no versions; address it as 'faults' alone" in response.json()["error"]
    request = _grpc_request([1.0], "versioned")
    request.model_version = "1"
    with grpc.insecure_channel(f"127.0.0.1:{pipeline.grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as raised:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "has no versions" in (raised.value.details() or "")
    assert pipeline.outbound.calls_of("versioned") == []


def test_configuration_and_statistics_say_why_they_are_missing_over_rest_too(pipeline: Pipeline) -> None:
    """gRPC ModelConfig/ModelStatistics are UNIMPLEMENTED with a reason; REST is a 501 with the same reason, not a
    404 'no route' that reads as if the application did not exist."""
    config = httpx.get(f"{pipeline.url}/v2/models/{APP}/config", timeout=10)
    assert config.status_code == 501, config.text
    assert config.json()["error"] == "a pipeline has no model configuration; use its model metadata"
    stats = httpx.get(f"{pipeline.url}/v2/models/{APP}/stats", timeout=10)
    assert stats.status_code == 501, stats.text
    assert stats.json()["error"].startswith("a pipeline keeps no statistics; ask each stage's model version")
    every = httpx.get(f"{pipeline.url}/v2/models/stats", timeout=10)
    assert every.status_code == 501, every.text
    other = httpx.get(f"{pipeline.url}/v2/models/other/config", timeout=10)
    assert other.status_code == 404 and "this pipeline serves application 'faults'" in other.json()["error"]
    with grpc.insecure_channel(f"127.0.0.1:{pipeline.grpc_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelConfig(service_pb2.ModelConfigRequest(name=APP), timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert raised.value.details() == "a pipeline has no model configuration; use its model metadata"
        # Triton's "every model" (no name) too.
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelStatistics(service_pb2.ModelStatisticsRequest(), timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert raised.value.details() == "a pipeline keeps no statistics; ask each stage's model version, or /metrics"


def test_a_stage_answer_over_the_message_limit_is_that_stages_500_not_a_429(pipeline: Pipeline) -> None:
    """gRPC says RESOURCE_EXHAUSTED for a message over the receiver's limit, which the OIP maps to 429: a client
    would retry a request that can never succeed; the limit is the pipeline's (--max-message-mb), so is the fault."""
    response = pipeline.infer([1010.0, 1.0, 2.0])
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert "stage 2 (last:1) of application 'faults' answered more than the pipeline's 1 MiB message limit" in error
    with grpc.insecure_channel(f"127.0.0.1:{pipeline.grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as raised:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_grpc_request([1010.0]), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INTERNAL, raised.value.details()
    assert "answered more than the pipeline's 1 MiB message limit" in (raised.value.details() or "")


@pytest.mark.parametrize(
    ("body", "headers", "fragment"),
    [
        (b"", {}, "the request body is empty"),
        (b"not json", {}, "the request body is not valid JSON"),
        (b"[]", {}, "the request body must be a JSON object with an 'inputs' list"),
        (b'{"inputs": {}}', {}, "the request body has no 'inputs' list"),
        (b'{"inputs": [1]}', {}, "inputs[0] must be an object"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": "2", "data": []}]}', {}, "'shape' must be a list"),
        (b'{"inputs": []}', {"Inference-Header-Content-Length": "99"}, "Inference-Header-Content-Length is 99"),
        (b"\xff\xfe{", {}, "the request body is not"),
    ],
    ids=["empty", "not-json", "array", "inputs-object", "input-number", "shape-string", "header-length", "bad-bytes"],
)
def test_a_malformed_body_is_400_naming_what_is_wrong(
    pipeline: Pipeline, body: bytes, headers: dict[str, str], fragment: str
) -> None:
    pipeline.wait_shadow_settled()  # a shadow copy of an earlier request would count as a call
    before = len(pipeline.outbound.calls)
    response = httpx.post(f"{pipeline.url}/v2/models/{APP}/infer", content=body, headers=headers, timeout=10)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    assert fragment in response.json()["error"], response.text
    assert len(pipeline.outbound.calls) == before
