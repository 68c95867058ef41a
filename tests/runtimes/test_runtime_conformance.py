"""Open Inference Protocol conformance of a real runtime, as the clients people already use see it.

tritonclient.http and tritonclient.grpc, sync and asyncio, against the echo runtimes of oip_echo.py (one input and
one output per datatype): health, metadata, model config and statistics, inference with every datatype as binary
and as JSON / typed contents, requested outputs, parameters, request ids, explicit and default versions, unknown
models and wrong datatypes. KServe's clients run in their own virtualenv (see test_kserve_clients).

Every test runs twice: against the runtime directly, and through a whole `hydro up` mesh (ingress Envoy, sidecar,
deployer) where the model is application `alltypes` / `typed`, reached with no extra header: the ingress chooses
the route from the URL (REST) or from the model name inside the gRPC request.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from hydro_mesh import Mesh
from oip_echo import DATATYPES, TYPED_DATATYPES, EchoRuntime, EchoTarget, input_name, output_name, sample
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

ROOT = Path(__file__).resolve().parents[2]
KSERVE_VENV = ROOT / ".venv-kserve"
KSERVE_PYTHON = KSERVE_VENV / "bin" / "python"
KSERVE_SCRIPT = Path(__file__).with_name("kserve_conformance.py")

Client = httpclient.InferenceServerClient | grpcclient.InferenceServerClient


def _inputs(module: Any, datatypes: Sequence[str], binary: bool | None = None) -> list[Any]:
    tensors = []
    for datatype in datatypes:
        data = sample(datatype)
        tensor = module.InferInput(input_name(datatype), list(data.shape), datatype)
        if binary is None:
            tensor.set_data_from_numpy(data)
        else:
            tensor.set_data_from_numpy(data, binary_data=binary)
        tensors.append(tensor)
    return tensors


def _assert_echo(result: Any, datatypes: Sequence[str]) -> None:
    for datatype in datatypes:
        expected = sample(datatype)
        got = result.as_numpy(output_name(datatype))
        assert got is not None, f"{datatype}: output missing"
        assert got.shape == expected.shape, datatype
        if datatype == "BYTES":
            # tritonclient gives JSON BYTES outputs back as str, binary ones as bytes.
            values = [v.encode() if isinstance(v, str) else bytes(v) for v in got.reshape(-1)]
            assert values == list(expected.reshape(-1)), datatype
        else:
            assert got.dtype == expected.dtype, datatype
            assert np.array_equal(got, expected), datatype


@pytest.fixture(scope="module", params=["direct", "ingress"])
def via(request: pytest.FixtureRequest) -> Mesh | None:
    """None for the runtimes themselves, else the mesh whose ingress serves them."""
    return request.getfixturevalue("echo_mesh") if request.param == "ingress" else None


def _target(runtime: EchoRuntime, mesh: Mesh | None) -> EchoTarget:
    if mesh is None:
        return EchoTarget(runtime.name, runtime.http_url, runtime.grpc_url, "direct")
    return EchoTarget(runtime.name, mesh.grpc_target, mesh.grpc_target, "ingress")


@pytest.fixture(scope="module")
def alltypes(alltypes: EchoRuntime, via: Mesh | None) -> EchoTarget:
    """The every-datatype echo model, directly or through the ingress."""
    return _target(alltypes, via)


@pytest.fixture(scope="module")
def typed(typed: EchoRuntime, via: Mesh | None) -> EchoTarget:
    """The typed-contents echo model (no FP16), directly or through the ingress."""
    return _target(typed, via)


# -- health, metadata, config, statistics ------------------------------------------------------------------------


def test_http_health_and_metadata(alltypes: EchoTarget) -> None:
    client = httpclient.InferenceServerClient(alltypes.http_url)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("alltypes") and client.is_model_ready("alltypes", "1")
        assert not client.is_model_ready("alltypes", "2")
        server = client.get_server_metadata()
        assert server["name"] == "hydro-serving"
        assert {"binary_tensor_data", "model_configuration", "statistics"} <= set(server["extensions"])
        for version in ("", "1"):
            metadata = client.get_model_metadata("alltypes", version)
            assert (metadata["name"], metadata["versions"], metadata["platform"]) == ("alltypes", ["1"], "python")
            assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [
                (input_name(d), d, [-1, 2]) for d in DATATYPES
            ]
        config = client.get_model_config("alltypes", "1")
        assert (config["name"], config["backend"], config["max_batch_size"]) == ("alltypes", "python", 0)
        by_name = {t["name"]: t for t in config["input"]}
        assert by_name["in_bytes"] == {"name": "in_bytes", "data_type": "TYPE_STRING", "dims": [-1, 2]}
        assert by_name["in_fp16"]["data_type"] == "TYPE_FP16"
        assert [t["name"] for t in config["output"]] == [output_name(d) for d in DATATYPES]
        with pytest.raises(InferenceServerException) as missing:
            client.get_model_metadata("nothing")
        assert "nothing" in missing.value.message()
    finally:
        client.close()


def test_grpc_health_and_metadata(alltypes: EchoTarget) -> None:
    client = grpcclient.InferenceServerClient(alltypes.grpc_url)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("alltypes") and client.is_model_ready("alltypes", "1")
        server = client.get_server_metadata()
        assert server.name == "hydro-serving" and "statistics" in server.extensions
        metadata = client.get_model_metadata("alltypes")
        assert (metadata.name, list(metadata.versions), metadata.platform) == ("alltypes", ["1"], "python")
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
            (input_name(d), d, [-1, 2]) for d in DATATYPES
        ]
        config = client.get_model_config("alltypes", "1").config
        assert (config.name, config.platform, config.backend, config.max_batch_size) == (
            "alltypes",
            "python",
            "python",
            0,
        )
        types = {t.name: t.data_type for t in config.input}
        assert types["in_bytes"] == grpcclient.model_config_pb2.TYPE_STRING
        assert types["in_uint16"] == grpcclient.model_config_pb2.TYPE_UINT16
        assert list(config.output[0].dims) == [-1, 2]
        with pytest.raises(InferenceServerException) as missing:
            client.get_model_config("nothing")
        assert missing.value.status() == "StatusCode.NOT_FOUND"
        assert "nothing" in (missing.value.message() or ""), missing.value
    finally:
        client.close()


def test_statistics_count_inferences(typed: EchoTarget) -> None:
    http = httpclient.InferenceServerClient(typed.http_url)
    grpc_client = grpcclient.InferenceServerClient(typed.grpc_url)
    try:
        before = http.get_inference_statistics("typed")["model_stats"][0]
        http.infer("typed", _inputs(httpclient, TYPED_DATATYPES))
        with pytest.raises(InferenceServerException) as missing:
            http.infer("typed", _inputs(httpclient, TYPED_DATATYPES[:1]))  # missing inputs: a failure
        assert missing.value.status() == "400" and "missing input" in missing.value.message(), missing.value
        after = http.get_inference_statistics("typed", "1")["model_stats"][0]
        assert (after["name"], after["version"]) == ("typed", "1")
        assert after["inference_count"] == before["inference_count"] + 1
        assert after["execution_count"] == before["execution_count"] + 1
        stats = after["inference_stats"]
        assert stats["success"]["count"] == before["inference_stats"]["success"]["count"] + 1
        assert stats["fail"]["count"] == before["inference_stats"]["fail"]["count"] + 1
        assert stats["compute_infer"]["ns"] > 0 and after["last_inference"] > 0
        assert after["batch_stats"] and after["batch_stats"][0]["batch_size"] == 1

        # Every model (no name) over REST and gRPC: the one this runtime serves. Through the ingress, a server-wide
        # call is answered by any ready replica of the mesh: here the alltypes or the typed runtime.
        over_rest = [s["name"] for s in http.get_inference_statistics()["model_stats"]]
        over_grpc = grpc_client.get_inference_statistics().model_stats
        if typed.via == "direct":
            assert over_rest == ["typed"]
            assert [(s.name, s.version) for s in over_grpc] == [("typed", "1")]
            assert over_grpc[0].inference_stats.success.count >= stats["success"]["count"]
        else:
            assert over_rest in (["typed"], ["alltypes"])
            assert [s.name for s in over_grpc] in (["typed"], ["alltypes"])
        assert grpc_client.get_inference_statistics("typed", "1").model_stats[0].execution_count > 0
        with pytest.raises(InferenceServerException) as missing:
            grpc_client.get_inference_statistics("nothing")
        assert missing.value.status() == "StatusCode.NOT_FOUND"
        assert "nothing" in (missing.value.message() or ""), missing.value
    finally:
        http.close()
        grpc_client.close()


# -- inference: every datatype ----------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_every_datatype(alltypes: EchoTarget, binary: bool) -> None:
    client = httpclient.InferenceServerClient(alltypes.http_url)
    try:
        outputs = [httpclient.InferRequestedOutput(output_name(d), binary_data=binary) for d in DATATYPES]
        result = client.infer(
            "alltypes", _inputs(httpclient, DATATYPES, binary), outputs=outputs, request_id="http-all"
        )
        _assert_echo(result, DATATYPES)
        response = result.get_response()
        assert (response["model_name"], response["model_version"], response["id"]) == ("alltypes", "1", "http-all")
        assert all(("data" in o) != binary for o in response["outputs"])
    finally:
        client.close()


def test_grpc_every_datatype_raw(alltypes: EchoTarget) -> None:
    client = grpcclient.InferenceServerClient(alltypes.grpc_url)
    try:
        result = client.infer("alltypes", _inputs(grpcclient, DATATYPES), request_id="grpc-all", model_version="1")
        _assert_echo(result, DATATYPES)
        response = result.get_response()
        assert (response.model_name, response.model_version, response.id) == ("alltypes", "1", "grpc-all")
        assert len(response.raw_output_contents) == len(DATATYPES)
    finally:
        client.close()


def _typed_request() -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="typed", id="typed-1")
    for datatype in TYPED_DATATYPES:
        data = sample(datatype)
        tensor = request.inputs.add(name=input_name(datatype), datatype=datatype, shape=list(data.shape))
        field = {
            "BOOL": "bool_contents",
            "INT64": "int64_contents",
            "UINT64": "uint64_contents",
            "FP32": "fp32_contents",
            "FP64": "fp64_contents",
            "BYTES": "bytes_contents",
        }.get(datatype, "uint_contents" if datatype.startswith("UINT") else "int_contents")
        getattr(tensor.contents, field).extend(data.reshape(-1).tolist())
    return request


def test_grpc_every_datatype_typed_contents(typed: EchoTarget) -> None:
    """Typed contents in, typed contents out (FP16 has no typed field; the typed model has none)."""
    with grpc.insecure_channel(typed.grpc_url) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_typed_request(), timeout=10)
    assert (response.model_name, response.id) == ("typed", "typed-1") and not response.raw_output_contents
    outputs = {o.name: o for o in response.outputs}
    for datatype in TYPED_DATATYPES:
        output = outputs[output_name(datatype)]
        assert (output.datatype, list(output.shape)) == (datatype, [3, 2])
        values = [f for f in output.contents.ListFields()]
        assert len(values) == 1, datatype
        assert list(values[0][1]) == sample(datatype).reshape(-1).tolist(), datatype


# -- requested outputs, parameters, versions ----------------------------------------------------------------------


def test_requested_outputs_and_parameters(alltypes: EchoTarget) -> None:
    wanted = ["FP16", "BYTES", "UINT64"]
    http = httpclient.InferenceServerClient(alltypes.http_url)
    grpc_client = grpcclient.InferenceServerClient(alltypes.grpc_url)
    try:
        outputs = [
            httpclient.InferRequestedOutput(output_name("FP16"), binary_data=True),
            httpclient.InferRequestedOutput(output_name("BYTES"), binary_data=False),
            httpclient.InferRequestedOutput(output_name("UINT64"), binary_data=True),
        ]
        parameters = {"tenant": "acme", "priority_hint": 3, "sampled": True, "ratio": 0.5}
        result = http.infer("alltypes", _inputs(httpclient, DATATYPES), outputs=outputs, parameters=parameters)
        assert [o["name"] for o in result.get_response()["outputs"]] == [output_name(d) for d in wanted]
        assert "data" in result.get_output(output_name("BYTES"))
        _assert_echo(result, wanted)

        grpc_outputs = [grpcclient.InferRequestedOutput(output_name(d)) for d in wanted]
        # tritonclient 2.41's gRPC client refuses float parameters (double_param came later).
        grpc_parameters = {k: v for k, v in parameters.items() if not isinstance(v, float)}
        grpc_result = grpc_client.infer(
            "alltypes", _inputs(grpcclient, DATATYPES), outputs=grpc_outputs, parameters=grpc_parameters
        )
        assert [o.name for o in grpc_result.get_response().outputs] == [output_name(d) for d in wanted]
        _assert_echo(grpc_result, wanted)

        with pytest.raises(InferenceServerException) as unknown:
            grpc_client.infer(
                "alltypes", _inputs(grpcclient, DATATYPES), outputs=[grpcclient.InferRequestedOutput("nope")]
            )
        assert unknown.value.status() == "StatusCode.INVALID_ARGUMENT" and "nope" in unknown.value.message()
    finally:
        http.close()
        grpc_client.close()


def test_explicit_default_and_wrong_versions(typed: EchoTarget) -> None:
    base = f"http://{typed.http_url}/v2/models/typed"
    body = {
        "id": "v",
        "inputs": [
            {"name": input_name(d), "datatype": d, "shape": [3, 2], "data": _json_data(d)} for d in TYPED_DATATYPES
        ],
    }
    for path in ("/infer", "/versions/1/infer"):
        response = httpx.post(base + path, json=body)
        assert response.status_code == 200, response.text
        assert (response.json()["model_version"], response.json()["id"]) == ("1", "v")
    for method, path in (("POST", "/versions/2/infer"), ("GET", "/versions/2/config")):
        wrong = httpx.request(method, base + path, json=body if method == "POST" else None)
        # Directly the runtime answers, naming the version it lacks; through the ingress, which deploys no
        # version 2, the ingress does.
        expected = "model 'typed' has no version '2' here (this runtime serves version 1)"
        if typed.via == "ingress":
            expected = (
                f"no deployed model version matches /v2/models/typed{path} (an application has no versions: "
                "/v2/models/{app}/infer addresses one); the manager's GET /api/v1/deployments lists the deployed "
                "versions"
            )
        assert (wrong.status_code, wrong.json()) == (404, {"error": expected}), path
    for path in ("/versions/1", "/versions/1/ready", "/versions/1/config", "/versions/1/stats", "/config", "/stats"):
        assert httpx.get(base + path).status_code == 200, path

    # gRPC: "" is the served version, "1" is explicit, "2" is not served here.
    with grpc.insecure_channel(typed.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for version in ("", "1"):
            request = _typed_request()
            request.model_version = version
            assert stub.ModelInfer(request, timeout=10).model_version == "1"
        request = _typed_request()
        request.model_version = "2"
        with pytest.raises(grpc.RpcError) as wrong:
            stub.ModelInfer(request, timeout=10)
        assert wrong.value.code() == grpc.StatusCode.NOT_FOUND
        lacking = "has no version '2'" if typed.via == "direct" else 'model_version ["2"]'
        assert lacking in (wrong.value.details() or ""), wrong.value.details()


def _json_data(datatype: str) -> list[Any]:
    data = sample(datatype).reshape(-1)
    return [v.decode() for v in data] if datatype == "BYTES" else data.tolist()


# -- errors -----------------------------------------------------------------------------------------------------


def test_unknown_model_and_wrong_datatype_sync(alltypes: EchoTarget) -> None:
    wrong = _inputs(httpclient, DATATYPES)
    wrong[0] = httpclient.InferInput(input_name("BOOL"), [3, 2], "INT8")
    wrong[0].set_data_from_numpy(sample("INT8"))
    http = httpclient.InferenceServerClient(alltypes.http_url)
    try:
        with pytest.raises(InferenceServerException) as unknown:
            http.infer("nothing", _inputs(httpclient, DATATYPES))
        assert "nothing" in unknown.value.message()
        with pytest.raises(InferenceServerException) as mismatch:
            http.infer("alltypes", wrong)
        assert "in_bool" in mismatch.value.message() and "INT8" in mismatch.value.message()
    finally:
        http.close()

    wrong_grpc = _inputs(grpcclient, DATATYPES)
    wrong_grpc[-1] = grpcclient.InferInput(input_name("BYTES"), [3, 2], "FP32")
    wrong_grpc[-1].set_data_from_numpy(sample("FP32"))
    client = grpcclient.InferenceServerClient(alltypes.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as unknown:
            client.infer("nothing", _inputs(grpcclient, DATATYPES))
        assert unknown.value.status() == "StatusCode.NOT_FOUND"
        assert "nothing" in (unknown.value.message() or ""), unknown.value
        with pytest.raises(InferenceServerException) as mismatch:
            client.infer("alltypes", wrong_grpc)
        assert mismatch.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "in_bytes" in mismatch.value.message() and "FP32" in mismatch.value.message()
    finally:
        client.close()


# -- asyncio clients --------------------------------------------------------------------------------------------


async def test_http_aio_client(alltypes: EchoTarget) -> None:
    client = httpaio.InferenceServerClient(alltypes.http_url)
    try:
        assert await client.is_server_live() and await client.is_server_ready()
        assert await client.is_model_ready("alltypes")
        metadata = await client.get_model_metadata("alltypes")
        assert metadata["name"] == "alltypes"
        assert (await client.get_model_config("alltypes"))["name"] == "alltypes"
        binary, plain = await asyncio.gather(
            client.infer("alltypes", _inputs(httpaio, DATATYPES, True), request_id="aio-1"),
            client.infer(
                "alltypes",
                _inputs(httpaio, DATATYPES, False),
                outputs=[httpaio.InferRequestedOutput(output_name(d), binary_data=False) for d in DATATYPES],
            ),
        )
        _assert_echo(binary, DATATYPES)
        _assert_echo(plain, DATATYPES)
        assert binary.get_response()["id"] == "aio-1"
        with pytest.raises(InferenceServerException) as unknown:
            await client.infer("nothing", _inputs(httpaio, DATATYPES))
        assert unknown.value.status() == "404" and "nothing" in unknown.value.message(), unknown.value
        wrong = _inputs(httpaio, DATATYPES)
        wrong[1] = httpaio.InferInput(input_name("INT8"), [3, 2], "UINT8")
        wrong[1].set_data_from_numpy(sample("UINT8"))
        with pytest.raises(InferenceServerException) as mismatch:
            await client.infer("alltypes", wrong)
        assert "in_int8" in mismatch.value.message()
    finally:
        await client.close()


async def test_grpc_aio_client(alltypes: EchoTarget) -> None:
    client = grpcaio.InferenceServerClient(alltypes.grpc_url)
    try:
        assert await client.is_server_live() and await client.is_server_ready()
        assert await client.is_model_ready("alltypes", "1")
        assert (await client.get_model_metadata("alltypes")).name == "alltypes"
        assert (await client.get_model_config("alltypes")).config.name == "alltypes"
        assert (await client.get_inference_statistics("alltypes")).model_stats[0].name == "alltypes"
        results = await asyncio.gather(
            *(client.infer("alltypes", _inputs(grpcaio, DATATYPES), request_id=f"aio-{i}") for i in range(4))
        )
        for i, result in enumerate(results):
            _assert_echo(result, DATATYPES)
            assert result.get_response().id == f"aio-{i}"
        with pytest.raises(InferenceServerException) as unknown:
            await client.infer("nothing", _inputs(grpcaio, DATATYPES))
        assert unknown.value.status() == "StatusCode.NOT_FOUND"
        assert "nothing" in (unknown.value.message() or ""), unknown.value
        wrong = _inputs(grpcaio, DATATYPES)
        wrong[9] = grpcaio.InferInput(input_name("FP16"), [3, 2], "FP32")
        wrong[9].set_data_from_numpy(sample("FP32"))
        with pytest.raises(InferenceServerException) as mismatch:
            await client.infer("alltypes", wrong)
        assert mismatch.value.status() == "StatusCode.INVALID_ARGUMENT" and "in_fp16" in mismatch.value.message()
    finally:
        await client.close()


# -- KServe's clients -------------------------------------------------------------------------------------------


def test_kserve_clients(alltypes: EchoTarget, typed: EchoTarget) -> None:
    """KServe's InferenceRESTClient and InferenceGRPCClient, from the `kserve` package in .venv-kserve.

    kserve pins another protobuf major and defines its own `inference` proto package, so it lives in its own
    virtualenv (`make kserve-venv`, a prerequisite of `make test`) and runs as a subprocess against our ports.
    """
    if not (KSERVE_VENV / ".installed").exists():
        pytest.skip(f"{KSERVE_VENV} is not installed (`make kserve-venv`, needs PyPI): KServe client checks skipped")
    targets = {
        "alltypes": {"http": alltypes.http_url, "grpc": alltypes.grpc_url, "datatypes": list(DATATYPES)},
        "typed": {"http": typed.http_url, "grpc": typed.grpc_url, "datatypes": list(TYPED_DATATYPES)},
    }
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(
        [str(KSERVE_PYTHON), str(KSERVE_SCRIPT), json.dumps(targets)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=KSERVE_SCRIPT.parent,
    )
    assert result.returncode == 0, f"KServe client checks failed:\n{result.stdout}\n{result.stderr}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["failed"] == [], report
    assert len(report["passed"]) >= 10, report


def test_runtimes_still_alive(echo_runtimes: dict[str, EchoRuntime]) -> None:
    for runtime in echo_runtimes.values():
        assert runtime.process.running, runtime.log()
        assert "Traceback" not in runtime.log(), runtime.log()
