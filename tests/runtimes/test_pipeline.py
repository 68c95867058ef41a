"""A three-stage pipeline through real Envoys: etcd, xds_control, seven model replicas (runtime + sidecar, registered
in etcd by the deployer's Replica), and the pipeline runtime behind its own sidecar, called on that sidecar's
inbound port over REST and gRPC.

Stages: millimetres to centimetres (python) -> iris classifier (scikit-learn) -> species name and confidence
(python, two variants at 50/50). Stage 1 has three shadows, copies of its model told to fail, to sleep 2 s, or
to disagree on every 4th call (tests/runtimes/pipeline_models/scale).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aetcd
import grpc
import httpx
import joblib
import numpy as np
import pytest
from framework_models import ROWS, sklearn_classifier
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2, service_pb2_grpc

from manager_api.deployer.registration import LeasedInstanceRegistry
from manager_api.deployer.replica import Replica, ReplicaConfig
from manager_api.etcd_server import EtcdServer
from manager_api.ports import free_port
from manager_api.processes import ChildProcess, http_ok, wait_until
from protos.topology.applications import Application, ShadowVariant, Stage, Variant
from protos.topology.deployments import Deployment
from protos.topology.keys import Keys
from protos.topology.policies import Policies
from runtimes.serving_config import load_serving_config
from xds_control.bootstrap import envoy_ready, pipeline_envoy

T = TypeVar("T")
MODELS = Path(__file__).resolve().parent / "pipeline_models"
APP = "iris-pipe"
#: Model versions: (model, version) -> (folder under MODELS, mode of the scale model).
SCALE_MODES = {1: "ok", 2: "fail", 3: "sleep", 4: "skew"}
SHADOWS = {2: "scale:2", 3: "scale:3", 4: "scale:4"}
OUTCOMES = ("agree", "disagree", "error")
STAGES_HEADER = "x-hydro-stages"
#: The stages header: stage 3 has two variants (post:1 and post:2, the same model), half the traffic each.
SERVED = re.compile(r"1=scale:1;2=clf:1;3=post:[12]")
SPECIES = ["setosa", "versicolor", "virginica"]


@dataclass
class PipelineStack:
    loop: asyncio.AbstractEventLoop
    client: aetcd.Client
    keys: Keys
    app: Application
    inbound_port: int
    http_port: int
    expected_labels: list[int]
    replicas: list[Replica] = field(default_factory=list)
    pipeline: ChildProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.inbound_port}"

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    def rest(self, raw: np.ndarray, model: str = APP, name: str = "raw") -> httpx.Response:
        body = {"inputs": [{"name": name, "datatype": "FP32", "shape": list(raw.shape), "data": raw.ravel().tolist()}]}
        # json.dumps writes NaN as Python's json (which the runtimes use) reads it; httpx's json= refuses NaN.
        content = json.dumps(body).encode()
        headers = {"content-type": "application/json"}
        return httpx.post(f"{self.url}/v2/models/{model}/infer", content=content, headers=headers, timeout=10)

    def grpc_infer(self, raw: np.ndarray, timeout: float = 10) -> tuple[service_pb2.ModelInferResponse, dict[str, str]]:
        request = service_pb2.ModelInferRequest(model_name=APP)
        request.inputs.add(name="raw", datatype="FP32", shape=list(raw.shape))
        request.raw_input_contents.append(raw.astype("<f4").tobytes())
        with grpc.insecure_channel(f"127.0.0.1:{self.inbound_port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            response, call = stub.ModelInfer.with_call(request, timeout=timeout)
        return response, {key: value for key, value in call.initial_metadata()}

    def shadow_worker_pid(self) -> int | None:
        """The pipeline runtime's shadow worker: its one child process."""
        assert self.pipeline is not None and self.pipeline.pid is not None
        children = subprocess.run(["pgrep", "-P", str(self.pipeline.pid)], capture_output=True, text=True).stdout
        pids = [int(pid) for pid in children.split()]
        assert len(pids) <= 1, pids
        return pids[0] if pids else None

    def put_application(self, app: Application) -> None:
        self.run(self.client.put(self.keys.application(APP).encode(), app.model_dump_json().encode()))

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The pipeline runtime's metrics by (sample name, sorted labels)."""
        text = httpx.get(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5).text
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


def metric(values: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return values.get((name, tuple(sorted({"app": APP, "stage": "1", **labels}.items()))), 0.0)


Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def delta(before: Metrics, after: Metrics, name: str, **labels: str) -> float:
    """How much a stage-1 sample grew from ``before`` to ``after``."""
    return metric(after, name, **labels) - metric(before, name, **labels)


def shadow_calls(before: Metrics, after: Metrics, shadow: str, outcomes: tuple[str, ...] = OUTCOMES) -> float:
    """Calls of ``shadow`` reported with one of ``outcomes`` since ``before``."""
    return sum(delta(before, after, "hydro_shadow_calls_total", shadow=shadow, outcome=o) for o in outcomes)


def wait_shadows_settled(stack: PipelineStack, what: str) -> None:
    """Until no shadow has a copy in flight."""

    def settled() -> bool:
        now = stack.metrics()
        return all(metric(now, "hydro_shadow_in_flight", shadow=s) == 0 for s in SHADOWS.values())

    wait_until(settled, 20, what)


def send_until_a_new_worker_reports(stack: PipelineStack, before: Metrics) -> int:
    """Calls, one per poll, until the skewing shadow's calls are reported again (a new worker gets copies only
    once it serves; those before are dropped and counted): how many calls were sent."""
    sent = 0

    def reported_again() -> bool:
        nonlocal sent
        assert stack.rest(ROWS * 10).status_code == 200
        sent += 1
        return shadow_calls(before, stack.metrics(), SHADOWS[4], ("agree", "disagree")) > 0

    wait_until(reported_again, 30, "the new worker's reports", interval=0.5)
    return sent


def _spec(app: Application, folders: dict[tuple[str, int], Path]) -> dict[str, Any]:
    signatures = {
        f"{model}:{version}": load_serving_config(folder).signature.model_dump(mode="json")
        for (model, version), folder in folders.items()
    }
    return {"application": app.model_dump(mode="json"), "signatures": signatures}


@pytest.fixture(scope="module")
def stack(etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PipelineStack]:
    work = tmp_path_factory.mktemp("pipeline")
    keys = Keys(f"/hydro-pipeline-{uuid.uuid4().hex[:8]}/")
    folders: dict[tuple[str, int], Path] = {}
    for version, mode in SCALE_MODES.items():
        folder = work / f"scale-{version}"
        shutil.copytree(MODELS / "scale", folder, ignore=shutil.ignore_patterns("__pycache__"))
        (folder / "mode").write_text(mode)
        folders[("scale", version)] = folder
    folders[("clf", 1)] = sklearn_classifier(work / "clf")
    folders[("post", 1)] = folders[("post", 2)] = MODELS / "post"
    expected = joblib.load(folders[("clf", 1)] / "model.joblib").predict(ROWS).tolist()

    app = Application(
        name=APP,
        stages=[
            Stage(
                variants=[Variant(model="scale", version=1, weight=100)],
                shadows=[ShadowVariant(model="scale", version=v) for v in SHADOWS],
            ),
            Stage(variants=[Variant(model="clf", version=1, weight=100)]),
            Stage(variants=[Variant(model="post", version=1, weight=50), Variant(model="post", version=2, weight=50)]),
        ],
    )
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(_spec(app, folders)))

    xds_port = free_port()
    xds = ChildProcess(
        "xds_control",
        [
            *(sys.executable, "-m", "xds_control", "--etcd", etcd_server.endpoint),
            *("--prefix", keys.prefix, "--port", str(xds_port)),
        ],
        log_path=work / "xds.log",
    )
    ports = {name: free_port() for name in ("grpc", "http", "inbound", "outbound", "admin")}
    pipeline = ChildProcess(
        "pipeline",
        [
            *(sys.executable, "-m", "runtimes.pipeline", "--spec", str(spec_path)),
            *("--outbound", f"127.0.0.1:{ports['outbound']}", "--grpc-port", str(ports["grpc"])),
            *("--http-port", str(ports["http"]), "--shadow-timeout", "3", "--max-shadows-in-flight", "4"),
            # Split over three stages: 1 s for the first, which the slow-stage test exceeds.
            *("--timeout", "3"),
        ],
        log_path=work / "pipeline.log",
    )
    sidecar = pipeline_envoy(
        work / "pipeline-sidecar",
        app=APP,
        instance="p1",
        xds_port=xds_port,
        admin_port=ports["admin"],
        inbound_port=ports["inbound"],
        outbound_port=ports["outbound"],
        runtime_grpc_port=ports["grpc"],
        runtime_http_port=ports["http"],
    )
    # The registry's lease keep-alive must run while the tests block on calls: the loop gets a thread.
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, name="pipeline-loop", daemon=True)
    loop_thread.start()
    client = aetcd.Client(host="127.0.0.1", port=etcd_server.client_port)
    registry = LeasedInstanceRegistry(client, keys, node="pipeline-test")
    stack = PipelineStack(loop, client, keys, app, ports["inbound"], ports["http"], expected, pipeline=pipeline)
    try:
        xds.start()
        stack.run(client.connect())
        stack.put_application(app)
        stack.run(registry.start())
        for (model, version), folder in folders.items():
            config = ReplicaConfig(
                model=model,
                version=version,
                model_dir=folder,
                node="pipeline-test",
                xds_host="127.0.0.1",
                xds_port=xds_port,
                workdir=work / f"{model}-{version}",
                drain_seconds=0,
            )
            stack.replicas.append(Replica(config, registry))
        stack.run(_gather(*(replica.start() for replica in stack.replicas)))
        sidecar.start()
        sidecar.wait_ready(lambda: envoy_ready(ports["admin"]), 30)
        # Only now: a client dialling a port nobody listens on yet can, rarely, connect to itself (TCP simultaneous
        # open) and hold the port, and then the sidecar cannot bind its outbound listener there.
        pipeline.start()
        pipeline.wait_ready(lambda: http_ok(f"{stack.url}/v2/health/ready"), 30)
        # Every stage's endpoints reach the outbound listener by EDS: wait for a whole answer, not for time.
        wait_until(lambda: stack.rest(ROWS * 10).status_code == 200, 30, "a first answer through every stage")
        yield stack
    finally:
        for step in [*(replica.stop(drain=False) for replica in stack.replicas), registry.stop(), client.close()]:
            try:
                stack.run(step)
            except Exception as exc:
                print(f"teardown step failed: {exc!r}")
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(10)
        loop.close()
        sidecar.stop()
        pipeline.stop()
        xds.stop()
        print(pipeline.log_tail(30))


async def _gather(*coroutines: Coroutine[Any, Any, None]) -> None:
    await asyncio.gather(*coroutines)


def _check_answer(stack: PipelineStack, outputs: dict[str, list[Any]]) -> None:
    assert outputs["species"] == [SPECIES[label] for label in stack.expected_labels]
    assert all(0.3 < c <= 1.0 for c in outputs["confidence"])


def _infer_by_turns(stack: PipelineStack, index: int) -> None:
    """One request of the 10-row batch, gRPC on odd ``index``, REST on even, checked to be answered right."""
    if index % 2:
        _, metadata = stack.grpc_infer(ROWS * 10)
        assert SERVED.fullmatch(metadata[STAGES_HEADER])
    else:
        response = stack.rest(ROWS * 10)
        assert response.status_code == 200, response.text
        _check_answer(stack, {o["name"]: o["data"] for o in response.json()["outputs"]})


def test_rest_and_grpc_answer_with_the_last_stage_and_name_every_stage(stack: PipelineStack) -> None:
    response = stack.rest(ROWS * 10)
    assert response.status_code == 200, response.text
    assert SERVED.fullmatch(response.headers[STAGES_HEADER])
    body = response.json()
    assert body["model_name"] == APP
    assert [o["name"] for o in body["outputs"]] == ["species", "confidence"]
    assert body["outputs"][0]["datatype"] == "BYTES"
    _check_answer(stack, {o["name"]: o["data"] for o in body["outputs"]})

    message, metadata = stack.grpc_infer(ROWS * 10)
    assert SERVED.fullmatch(metadata[STAGES_HEADER])
    assert [o.name for o in message.outputs] == ["species", "confidence"]
    # Raw in, raw out: the last stage's bytes (BYTES: 4-byte little-endian length prefixes).
    species_raw = message.raw_output_contents[0]
    names, offset = [], 0
    while offset < len(species_raw):
        length = int.from_bytes(species_raw[offset : offset + 4], "little")
        names.append(species_raw[offset + 4 : offset + 4 + length].decode())
        offset += 4 + length
    confidence = np.frombuffer(message.raw_output_contents[1], dtype="<f4").tolist()
    _check_answer(stack, {"species": names, "confidence": confidence})

    # Typed contents in, typed contents out.
    typed = service_pb2.ModelInferRequest(model_name=APP)
    tensor = typed.inputs.add(name="raw", datatype="FP32", shape=list(ROWS.shape))
    tensor.contents.fp32_contents.extend((ROWS * 10).ravel().tolist())
    with grpc.insecure_channel(f"127.0.0.1:{stack.inbound_port}") as channel:
        answer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(typed, timeout=10)
    assert not answer.raw_output_contents
    species = [b.decode() for b in answer.outputs[0].contents.bytes_contents]
    _check_answer(stack, {"species": species, "confidence": list(answer.outputs[1].contents.fp32_contents)})

    metadata_response = httpx.get(f"{stack.url}/v2/models/{APP}", timeout=5).json()
    assert [t["name"] for t in metadata_response["inputs"]] == ["raw"]
    assert [t["name"] for t in metadata_response["outputs"]] == ["species", "confidence"]


def test_a_failing_stage_is_named_and_keeps_its_status(stack: PipelineStack) -> None:
    # The python model raises on negative lengths: stage 1, a model error (500).
    failed = stack.rest(-ROWS)
    assert failed.status_code == 500
    assert "stage 1 (scale:1) of application 'iris-pipe' failed" in failed.json()["error"]
    assert "negative length" in failed.json()["error"]
    # NaN passes stage 1 (NaN / 10) and the scikit-learn runtime refuses it: stage 2, the client's mistake (400).
    nan = ROWS.copy()
    nan[0, 0] = np.nan
    refused = stack.rest(nan)
    assert refused.status_code == 400
    assert "stage 2 (clf:1) of application 'iris-pipe' failed: INVALID_ARGUMENT" in refused.json()["error"]
    with pytest.raises(grpc.RpcError) as raised:
        stack.grpc_infer(nan)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stage 2 (clf:1)" in (raised.value.details() or "")


def test_bad_requests_are_refused_before_any_stage(stack: PipelineStack) -> None:
    wrong_input = stack.rest(ROWS, name="input")
    assert wrong_input.status_code == 400
    assert "unknown input 'input'; application 'iris-pipe' expects: raw (FP32 [-1, 4])" in wrong_input.json()["error"]
    wrong_model = stack.rest(ROWS, model="other")
    assert wrong_model.status_code == 404
    assert "this pipeline serves application 'iris-pipe'" in wrong_model.json()["error"]
    versioned = httpx.post(f"{stack.url}/v2/models/{APP}/versions/1/infer", json={}, timeout=5)
    assert versioned.status_code == 404
    assert "has no versions" in versioned.json()["error"]


def test_a_gzip_body_is_answered_and_one_inflating_past_the_limit_is_refused(stack: PipelineStack) -> None:
    # Through the pipeline's sidecar, as the ingress sends it; the stand-in tests (test_pipeline_stage_faults.py)
    # cover the other encodings and the limit of plain bodies.
    raw = ROWS * 10
    body = {"inputs": [{"name": "raw", "datatype": "FP32", "shape": list(raw.shape), "data": raw.ravel().tolist()}]}
    url = f"{stack.url}/v2/models/{APP}/infer"
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    answered = httpx.post(url, content=gzip.compress(json.dumps(body).encode()), headers=headers, timeout=10)
    assert answered.status_code == 200, answered.text
    assert SERVED.fullmatch(answered.headers[STAGES_HEADER])
    _check_answer(stack, {o["name"]: o["data"] for o in answered.json()["outputs"]})
    # About 64 KiB on the wire, one byte over the runtime's 64 MiB once inflated.
    bomb = gzip.compress(b" " * (64 * 2**20 + 1))
    refused = httpx.post(url, content=bomb, headers=headers, timeout=10)
    assert refused.status_code == 413, refused.text
    assert "the decompressed request body is larger than the 64 MiB limit" in refused.json()["error"]


def test_shadows_never_reach_the_caller_and_are_measured(stack: PipelineStack) -> None:
    requests = 40
    # Sleeping copies of the earlier tests' calls may still be running (they would count against the cap).
    wait_shadows_settled(stack, "no shadow call left from earlier tests")
    before = stack.metrics()
    latencies = []
    for index in range(requests):
        started = time.perf_counter()
        _infer_by_turns(stack, index)
        latencies.append(time.perf_counter() - started)
    # The sleeping shadow takes 2 s a call: the caller must not wait for any of it.
    assert sorted(latencies)[int(0.99 * requests) - 1] < 0.5, f"p99 {sorted(latencies)[-2]:.3f} s"

    # Sleeping copies over the in-flight cap were dropped; the others finish or time out (3 s) in the background.
    wait_shadows_settled(stack, "every shadow call finished")
    after = stack.metrics()

    def grown(name: str, **labels: str) -> float:
        return delta(before, after, name, **labels)

    calls = "hydro_shadow_calls_total"
    for shadow in SHADOWS.values():
        dropped = grown("hydro_shadow_dropped_total", shadow=shadow)
        assert shadow_calls(before, after, shadow) + dropped == requests, shadow

    failing = SHADOWS[2]
    assert grown(calls, shadow=failing, outcome="error") > 0
    assert grown(calls, shadow=failing, outcome="agree") == grown(calls, shadow=failing, outcome="disagree") == 0

    sleeping = SHADOWS[3]
    assert grown("hydro_shadow_dropped_total", shadow=sleeping) > 0, "more than 4 sleeping copies at once"
    slow = grown("hydro_shadow_latency_seconds_count", shadow=sleeping) - grown(
        "hydro_shadow_latency_seconds_bucket", shadow=sleeping, le="1.0"
    )
    assert slow > 0, "the sleeping shadow's 2 s calls are in its latency histogram"

    # Every 4th call to the skewed shadow (counted by the model since it started) disagrees.
    skewed = SHADOWS[4]
    assert grown("hydro_shadow_dropped_total", shadow=skewed) == 0
    agreed = metric(after, calls, shadow=skewed, outcome="agree")
    disagreed = metric(after, calls, shadow=skewed, outcome="disagree")
    assert disagreed == (agreed + disagreed) // 4
    ratio = metric(after, "hydro_shadow_agreement_ratio", shadow=skewed)
    assert ratio == pytest.approx(agreed / (agreed + disagreed))
    assert 0.7 <= ratio <= 0.8


def test_a_killed_shadow_worker_never_reaches_the_caller_and_is_started_again(stack: PipelineStack) -> None:
    wait_shadows_settled(stack, "no shadow call left from earlier tests")
    killed = stack.shadow_worker_pid()
    assert killed is not None, "the pipeline runtime runs a shadow worker"
    before = stack.metrics()
    os.kill(killed, signal.SIGKILL)
    # Callers keep their answers (both protocols) and /metrics is served, while the worker is down and after.
    requests = 20
    for index in range(requests):
        _infer_by_turns(stack, index)
        if index == 0:
            assert stack.metrics()
    wait_until(lambda: stack.shadow_worker_pid() not in (None, killed), 20, "a new shadow worker")

    # The copies the dead worker had and those made while it was down are dropped, and counted.
    skewed = SHADOWS[4]
    wait_shadows_settled(stack, "every shadow call finished")
    assert delta(before, stack.metrics(), "hydro_shadow_dropped_total", shadow=skewed) > 0

    # The new worker makes the shadow calls again once it serves: every copy is either reported or dropped.
    requests += send_until_a_new_worker_reports(stack, before)

    def accounted() -> bool:
        after = stack.metrics()
        reported = shadow_calls(before, after, skewed, ("agree", "disagree"))
        return reported + delta(before, after, "hydro_shadow_dropped_total", shadow=skewed) == requests

    wait_until(accounted, 20, "every copy reported or dropped")
    wait_shadows_settled(stack, "the sleeping shadow's calls finished")
    after = stack.metrics()
    for shadow in SHADOWS.values():
        dropped = delta(before, after, "hydro_shadow_dropped_total", shadow=shadow)
        assert shadow_calls(before, after, shadow) + dropped == requests, shadow


def test_a_silent_shadow_worker_is_killed_and_started_again(stack: PipelineStack) -> None:
    """A worker that lives but reports nothing (here: stopped) would hold every shadow at its in-flight cap for
    good; the runtime's watchdog kills it once it has been silent longer than a shadow call may take."""
    wait_shadows_settled(stack, "no shadow call left from earlier tests")
    silent = stack.shadow_worker_pid()
    assert silent is not None, "the pipeline runtime runs a shadow worker"
    before = stack.metrics()
    assert stack.pipeline is not None and stack.pipeline.log_path is not None
    log_before = stack.pipeline.log_path.read_text()
    os.kill(silent, signal.SIGSTOP)
    try:
        # More calls than --max-shadows-in-flight (4): the stopped worker is handed 4 copies per shadow, the rest
        # are dropped at once. The callers never wait for it.
        requests = 6
        for index in range(requests):
            _infer_by_turns(stack, index)
        # --shadow-timeout 3 + 5 s of grace, then the restart back-off (doubled by the previous test's kill).
        wait_until(lambda: stack.shadow_worker_pid() not in (None, silent), 40, "the silent worker replaced")
        successor = stack.shadow_worker_pid()
        assert not Path(f"/proc/{silent}").exists(), "the silent worker was killed, not left stopped"
    finally:
        try:
            os.kill(silent, signal.SIGKILL)
        except ProcessLookupError:
            pass

    # It reported nothing: the copies it held (4 per shadow) count as dropped, with those over the cap; none is
    # lost or left in flight. (Copies made after it was killed are dropped too, until its successor serves.)
    wait_shadows_settled(stack, "the silent worker's copies counted")
    after = stack.metrics()
    for shadow in SHADOWS.values():
        assert shadow_calls(before, after, shadow) == 0, shadow
        assert delta(before, after, "hydro_shadow_dropped_total", shadow=shadow) == requests, shadow
    log = stack.pipeline.log_path.read_text()[len(log_before) :]
    assert f"(pid {silent}) reported nothing for" in log, log

    # Its successor makes the calls again once it serves (copies sent before that are dropped and counted).
    requests += send_until_a_new_worker_reports(stack, before)
    wait_shadows_settled(stack, "the new worker's calls finished")
    after = stack.metrics()
    for shadow in SHADOWS.values():
        dropped = delta(before, after, "hydro_shadow_dropped_total", shadow=shadow)
        assert shadow_calls(before, after, shadow) + dropped == requests, shadow
    # The watchdog leaves a working worker alone (the sleeping shadow's calls took 2 s each).
    assert stack.shadow_worker_pid() == successor


def test_stage_variants_share_traffic_by_weight_and_a_weight_change_fails_nothing(stack: PipelineStack) -> None:
    def last_stage() -> str:
        response = stack.rest(ROWS * 10)
        assert response.status_code == 200, response.text
        return response.headers[STAGES_HEADER].rsplit("=", 1)[1]

    shares = Counter(last_stage() for _ in range(60))
    assert set(shares) == {"post:1", "post:2"}
    assert min(shares.values()) >= 12, shares  # 50/50: fewer than 12 of 60 happens once in ~10^6 runs

    stages = list(stack.app.stages)
    variants = [Variant(model="post", version=1, weight=0), Variant(model="post", version=2, weight=100)]
    stages[2] = Stage(variants=variants)
    stack.put_application(stack.app.model_copy(update={"stages": stages}))
    # Requests keep flowing while the new weights reach the outbound routes (RDS): none may fail.
    streak = 0
    deadline = time.monotonic() + 20
    while streak < 20:
        assert time.monotonic() < deadline, "the new weights did not reach the pipeline's sidecar"
        streak = streak + 1 if last_stage() == "post:2" else 0
    stack.put_application(stack.app)


def test_a_stage_deployments_rate_limit_holds_for_the_pipelines_calls(stack: PipelineStack) -> None:
    # One request a second for clf:1 (stage 2), written as the manager writes a deployment: the pipeline
    # sidecar's stage route enforces it (a token bucket of one, refilled each second), and the refusal names
    # the stage and keeps its status (429 over REST, RESOURCE_EXHAUSTED over gRPC).
    limited = Deployment(
        model="clf", version=1, replicas=1, policies=Policies.model_validate({"rate_limit": {"requests_per_second": 1}})
    )
    key = stack.keys.deployment("clf", 1).encode()
    stack.run(stack.client.put(key, limited.model_dump_json().encode()))
    try:
        refused: list[httpx.Response] = []

        def refused_by_the_limit() -> bool:
            # Two at once: the second finds the bucket empty.
            answers = [stack.rest(ROWS * 10) for _ in range(2)]
            refused.extend(a for a in answers if a.status_code != 200)
            return bool(refused)

        wait_until(refused_by_the_limit, 20, "a pipeline call refused by stage 2's rate limit", interval=1.1)
        assert refused[0].status_code == 429, refused[0].text
        error = refused[0].json()["error"]
        assert "stage 2 (clf:1) of application 'iris-pipe' failed: RESOURCE_EXHAUSTED" in error, error
        assert "too many requests" in error and "rate_limit" in error, error
        with pytest.raises(grpc.RpcError) as raised:
            for _ in range(3):
                stack.grpc_infer(ROWS * 10)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "stage 2 (clf:1)" in (raised.value.details() or ""), raised.value.details()
    finally:
        stack.run(stack.client.delete(key))
    # Without the record the defaults apply again: no limit.
    wait_until(lambda: all(stack.rest(ROWS * 10).status_code == 200 for _ in range(3)), 20, "the limit lifted")


# Last: the slow calls hold the first stage's worker threads for 2 s.
def test_the_time_budget_is_split_across_stages(stack: PipelineStack) -> None:
    slow = ROWS * 10
    slow[0, 0] = 9999
    # --timeout 3 over three stages: the first gets 1 s, and its 2 s answer is cut off there.
    started = time.perf_counter()
    response = stack.rest(slow)
    elapsed = time.perf_counter() - started
    assert response.status_code == 504, response.text
    assert "stage 1 (scale:1) of application 'iris-pipe' failed: DEADLINE_EXCEEDED" in response.json()["error"]
    assert 0.9 < elapsed < 1.8
    # The caller's own deadline, when shorter, is the budget: 0.6 s gives the first stage 0.2 s.
    started = time.perf_counter()
    with pytest.raises(grpc.RpcError) as raised:
        stack.grpc_infer(slow, timeout=0.6)
    elapsed = time.perf_counter() - started
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "stage 1 (scale:1)" in (raised.value.details() or ""), raised.value.details()
    assert elapsed < 0.55
