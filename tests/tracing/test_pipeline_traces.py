"""One request to a three-stage application with a shadow is one trace (issue 7, acceptance 1).

`hydro up --otlp-endpoint` (real etcd, xds_control, manager and ingress; the deployer starts every runtime, the
pipeline runtime and their sidecars, all with the receiver's address) serves the iris pipeline (python features ->
scikit-learn classifier -> ONNX scorer) with scorer version 2 shadowing stage 3. One request over REST and one
over gRPC each give exactly one trace id, holding the spans of every process the request went through, linked:

    ingress server -> ingress attempt -> pipeline sidecar inbound -> pipeline runtime
        -> stage i (pipeline, client) -> pipeline sidecar outbound -> outbound attempt -> sidecar m:v -> runtime m:v
        -> shadow 3 (pipeline, client) -> the same four for iris-scorer:2 (finished after the response)
"""

from __future__ import annotations

import os
import runpy
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from hydro_mesh import ROWS, Mesh, running_mesh
from otlp_receiver import OtlpReceiver, ReceivedSpan
from tritonclient.grpc import service_pb2, service_pb2_grpc

from manager_api.processes import wait_until

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "iris-pipeline"
APP = "iris-pipeline"
STAGE_MODELS = ("iris-features:1", "iris-classifier:1", "iris-scorer:1")
SHADOW = "iris-scorer:2"
PIPELINE = f"pipeline {APP}"
PIPELINE_SIDECAR = f"sidecar {APP}:pipeline"
#: ingress 2, pipeline sidecar inbound 1, pipeline 1, and per stage and the shadow: the pipeline's call span, the
#: outbound server and attempt spans, the model's sidecar and runtime.
SPANS_PER_REQUEST = 2 + 1 + 1 + 5 * (len(STAGE_MODELS) + 1)


@pytest.fixture(scope="module")
def mesh(receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    models = tmp_path_factory.mktemp("iris-pipeline")
    runpy.run_path(str(EXAMPLE / "train_pipeline.py"))["train"](models)
    # Only the receiver: the test process's own OTEL_* variables stay out; the SDKs export every 200 ms.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["OTEL_BSP_SCHEDULE_DELAY"] = "200"
    argv = ["--otlp-endpoint", receiver.endpoint]
    with running_mesh(tmp_path_factory.mktemp("hydro"), extra_args=argv, env=env) as running:
        for folder, model in (("features", "iris-features"), ("classifier", "iris-classifier")):
            running.api.push_model(model, models / folder)
            running.api.deploy(model, 1, replicas=1)
        for version in (1, 2):
            assert running.api.push_model("iris-scorer", models / "scorer")["version"] == version
            running.api.deploy("iris-scorer", version, replicas=1)
        stages: list[dict[str, object]] = [
            {"variants": [{"model": m.split(":")[0], "version": 1, "weight": 100}]} for m in STAGE_MODELS
        ]
        stages[2]["shadows"] = [{"model": "iris-scorer", "version": 2}]
        running.api.put_application_stages(APP, stages)
        # The shadow must be ready too, or the first traces miss its runtime.
        wait_until(
            lambda: running.api.get_deployment("iris-scorer", 2)["ready_replicas"] == 1, 180, "the shadow version"
        )
        wait_until(lambda: _rest(running).status_code == 200, 180, "the pipeline through the ingress")
        yield running


def _rest(mesh: Mesh) -> httpx.Response:
    body = {"inputs": [{"name": "measurements", "shape": list(ROWS.shape), "datatype": "FP64", "data": ROWS.tolist()}]}
    return httpx.post(f"{mesh.ingress}/v2/models/{APP}/infer", json=body, timeout=30)


def _grpc(mesh: Mesh) -> dict[str, str]:
    request = service_pb2.ModelInferRequest(model_name=APP)
    typed = request.inputs.add(name="measurements", datatype="FP64", shape=list(ROWS.shape))
    typed.contents.fp64_contents.extend(ROWS.ravel().tolist())
    with grpc.insecure_channel(mesh.grpc_target) as channel:
        _, call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(request, timeout=30)
    return {key: str(value) for key, value in call.initial_metadata()}


def _whole(trace_id: str) -> Callable[[list[ReceivedSpan]], bool]:
    def done(spans: list[ReceivedSpan]) -> bool:
        return len([s for s in spans if s.trace_id == trace_id]) >= SPANS_PER_REQUEST

    return done


def _one(spans: list[ReceivedSpan], what: str, match: Callable[[ReceivedSpan], bool]) -> ReceivedSpan:
    found = [s for s in spans if match(s)]
    assert len(found) == 1, f"expected one {what}, found {len(found)}: {found}"
    return found[0]


def _check_trace(spans: list[ReceivedSpan], protocol: str) -> None:
    """Every span of one request, each under the parent it must have."""
    by_id = {s.span_id: s for s in spans}
    assert len(by_id) == len(spans) == SPANS_PER_REQUEST, [(s.service, s.name) for s in spans]
    assert not [s for s in spans if s.error], "nothing failed"

    def parent(span: ReceivedSpan) -> ReceivedSpan:
        assert span.parent_id in by_id, f"the parent of {span} is not in the trace"
        return by_id[span.parent_id]

    ingress = _one(spans, "ingress server span", lambda s: s.service == "ingress" and s.is_server)
    assert ingress.parent_id == "", "the ingress starts the trace"
    attempt = _one(spans, "ingress attempt", lambda s: s.service == "ingress" and s.is_client)
    assert parent(attempt) == ingress
    pipeline = _one(spans, "pipeline runtime span", lambda s: s.service == PIPELINE and s.is_server)
    inbound = parent(pipeline)
    assert (inbound.service, inbound.is_server) == (PIPELINE_SIDECAR, True), inbound
    assert parent(inbound) == attempt
    assert pipeline.attributes["hydro.application"] == APP
    assert pipeline.attributes["hydro.protocol"] == protocol
    assert pipeline.attributes["hydro.batch_size"] == len(ROWS)
    assert pipeline.attributes["hydro.stages"] == ";".join(f"{i}={m}" for i, m in enumerate(STAGE_MODELS, 1))

    calls = {s.name: s for s in spans if s.service == PIPELINE and s.is_client}
    assert set(calls) == {"stage 1", "stage 2", "stage 3", f"shadow 3 {SHADOW}"}
    for name, call in calls.items():
        assert parent(call) == pipeline, name
        assert call.attributes["hydro.application"] == APP
    for index, model in enumerate(STAGE_MODELS, start=1):
        stage = calls[f"stage {index}"]
        assert (stage.attributes["hydro.stage"], stage.attributes["hydro.variant"]) == (index, model)
        _check_call(spans, stage, model)
    shadow = calls[f"shadow 3 {SHADOW}"]
    assert (shadow.attributes["hydro.stage"], shadow.attributes["hydro.shadow"]) == (3, SHADOW)
    assert shadow.attributes["hydro.shadow_outcome"] == "agree", "the same scorer twice agrees"
    _check_call(spans, shadow, SHADOW)


def _check_call(spans: list[ReceivedSpan], call: ReceivedSpan, model: str) -> None:
    """call (pipeline) -> outbound server -> outbound attempt -> the model's sidecar -> its runtime."""
    outbound = _one(spans, f"outbound span of {call.name}", lambda s: s.parent_id == call.span_id)
    assert (outbound.service, outbound.is_server) == (PIPELINE_SIDECAR, True), outbound
    attempt = _one(spans, f"outbound attempt of {call.name}", lambda s: s.parent_id == outbound.span_id)
    assert (attempt.service, attempt.is_client) == (PIPELINE_SIDECAR, True), attempt
    sidecar = _one(spans, f"sidecar span of {call.name}", lambda s: s.parent_id == attempt.span_id)
    assert (sidecar.service, sidecar.is_server) == (f"sidecar {model}", True), sidecar
    runtime = _one(spans, f"runtime span of {call.name}", lambda s: s.parent_id == sidecar.span_id)
    assert (runtime.service, runtime.is_server) == (f"runtime {model}", True), runtime
    # A stage call names the application (the runtime takes it as its own name); a shadow copy its model version.
    if call.name.startswith("shadow"):
        name, _, version = model.partition(":")
        assert (runtime.attributes["hydro.model"], runtime.attributes["hydro.version"]) == (name, version)
    else:
        assert (runtime.attributes["hydro.model"], runtime.attributes["hydro.application"]) == (APP, APP)


def _request_traces(spans: list[ReceivedSpan], request_id: str) -> set[str]:
    """The trace ids of every span that names the request's x-request-id (Envoy's tag, or ours)."""
    return {
        s.trace_id
        for s in spans
        if request_id in (s.attributes.get("guid:x-request-id"), s.attributes.get("hydro.request_id"))
    }


def test_a_rest_request_to_a_pipeline_is_one_trace(mesh: Mesh, receiver: OtlpReceiver) -> None:
    receiver.clear()
    response = _rest(mesh)
    assert response.status_code == 200, response.text
    trace_id = response.headers["x-hydro-trace-id"]
    spans = receiver.wait_for(_whole(trace_id), 30, "every span of the REST request, the shadow's included")
    mine = [s for s in spans if s.trace_id == trace_id]
    _check_trace(mine, "rest")
    assert _request_traces(spans, response.headers["x-request-id"]) == {trace_id}, "one request, one trace"
    # The request id reaches every process (the pipeline passes it on with the trace context).
    tagged = {s.service for s in mine if s.attributes.get("hydro.request_id") == response.headers["x-request-id"]}
    assert tagged == {PIPELINE, *(f"runtime {m}" for m in (*STAGE_MODELS, SHADOW))}


def test_a_grpc_request_to_a_pipeline_is_one_trace(mesh: Mesh, receiver: OtlpReceiver) -> None:
    receiver.clear()
    headers = _grpc(mesh)
    trace_id = headers["x-hydro-trace-id"]
    spans = receiver.wait_for(_whole(trace_id), 30, "every span of the gRPC request, the shadow's included")
    _check_trace([s for s in spans if s.trace_id == trace_id], "grpc")
    assert _request_traces(spans, headers["x-request-id"]) == {trace_id}, "one request, one trace"


def test_a_refused_request_is_recorded_on_the_pipeline_span(mesh: Mesh, receiver: OtlpReceiver) -> None:
    receiver.clear()
    body = {"inputs": [{"name": "petals", "shape": [1, 4], "datatype": "FP64", "data": [1.0, 2.0, 3.0, 4.0]}]}
    response = httpx.post(f"{mesh.ingress}/v2/models/{APP}/infer", json=body, timeout=30)
    assert response.status_code == 400 and "petals" in response.json()["error"], response.text
    trace_id = response.headers["x-hydro-trace-id"]

    def recorded(spans: list[ReceivedSpan]) -> bool:
        return any(s.trace_id == trace_id and s.service == PIPELINE for s in spans)

    spans = [s for s in receiver.wait_for(recorded, 30, "the refused request's span") if s.trace_id == trace_id]
    pipeline = _one(spans, "pipeline span", lambda s: s.service == PIPELINE)
    assert pipeline.attributes["hydro.error_status"] == 400 and "exception" in pipeline.events
    assert not pipeline.error, "a client's bad request is not the server's error"


def test_a_failed_stage_is_recorded_on_its_span(mesh: Mesh, receiver: OtlpReceiver) -> None:
    # Last in the module: stage 2 loses its only replica.
    mesh.api.delete_deployment("iris-classifier", 1)
    wait_until(lambda: _rest(mesh).status_code == 503, 120, "stage 2 to fail")
    receiver.clear()
    response = _rest(mesh)
    assert response.status_code == 503 and "stage 2 (iris-classifier:1)" in response.json()["error"], response.text
    trace_id = response.headers["x-hydro-trace-id"]

    def recorded(spans: list[ReceivedSpan]) -> bool:
        mine = [s for s in spans if s.trace_id == trace_id and s.service == PIPELINE]
        return {s.name for s in mine} == {f"pipeline {APP}", "stage 1", "stage 2"}

    spans = [s for s in receiver.wait_for(recorded, 30, "the failed request's spans") if s.trace_id == trace_id]
    stage = _one(spans, "stage 2 span", lambda s: s.name == "stage 2")
    assert stage.error and "exception" in stage.events and stage.attributes["hydro.error_status"] == 503
    pipeline = _one(spans, "pipeline span", lambda s: s.service == PIPELINE and s.is_server)
    assert pipeline.error and pipeline.attributes["hydro.error_status"] == 503
    assert not [s for s in spans if s.name.startswith("shadow")], "no shadow for a request that failed before it"
