"""KServe's InferenceRESTClient and InferenceGRPCClient against running echo runtimes (see oip_echo.py).

Run by test_runtime_conformance.py::test_kserve_clients with the python of .venv-kserve, never in the test
process: the `kserve` package pins its own protobuf major and defines its own `inference` proto package.
Usage: python kserve_conformance.py '{"alltypes": {"http": "h:p", "grpc": "h:p", "datatypes": [...]}, ...}'
Prints one line per check and, last, a JSON object {"passed": [...], "failed": [...]}; exits 1 if any failed.
"""

from __future__ import annotations

import asyncio
import json
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import httpx
import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.grpc.grpc_predict_v2_pb2 import ModelMetadataRequest
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from kserve.protocol.infer_type import RequestedOutput

# The same tensors as oip_echo.sample (this script cannot import the project's test helpers).


def sample(datatype: str) -> np.ndarray:
    if datatype == "BOOL":
        return np.array([[True, False], [False, True], [True, True]])
    if datatype == "BYTES":
        values = [b"hydro", b"", "h\u00e9llo".encode(), b"a\x00b", b"x" * 40, b"\xe2\x9c\x93"]
        return np.array(values, dtype=np.object_).reshape(3, 2)
    dtype = np.dtype(datatype.lower().replace("fp", "float"))
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.array([[info.min, info.max], [0, 1], [7, 42]], dtype=dtype)
    return np.array([[1.5, -2.25], [0.0, 65504.0], [-0.125, 3.0]], dtype=dtype)


def in_name(datatype: str) -> str:
    return f"in_{datatype.lower()}"


def out_name(datatype: str) -> str:
    return f"out_{datatype.lower()}"


def numpy_inputs(datatypes: list[str], binary: bool) -> list[InferInput]:
    tensors = []
    for datatype in datatypes:
        data = sample(datatype)
        tensor = InferInput(in_name(datatype), list(data.shape), datatype)
        # KServe refuses FP16 as JSON: it always travels as binary data.
        tensor.set_data_from_numpy(data, binary_data=binary or datatype == "FP16")
        tensors.append(tensor)
    return tensors


def list_inputs(datatypes: list[str]) -> list[InferInput]:
    """Inputs given as Python lists: JSON data over REST, typed contents over gRPC."""
    tensors = []
    for datatype in datatypes:
        data = sample(datatype)
        values = [v.decode() for v in data.reshape(-1)] if datatype == "BYTES" else data.reshape(-1).tolist()
        tensors.append(InferInput(in_name(datatype), list(data.shape), datatype, data=values))
    return tensors


def check_echo(response: Any, datatypes: list[str]) -> None:
    for datatype in datatypes:
        expected = sample(datatype)
        output = response.get_output_by_name(out_name(datatype))
        assert output is not None, f"{datatype}: output missing"
        got = output.as_numpy()
        assert list(got.shape) == list(expected.shape), (datatype, got.shape)
        if datatype == "BYTES":
            values = [v.encode() if isinstance(v, str) else bytes(v) for v in got.reshape(-1)]
            assert values == list(expected.reshape(-1)), (datatype, values)
        else:
            assert np.array_equal(got.astype(expected.dtype), expected), (datatype, got)


async def main(targets: dict[str, dict[str, Any]]) -> int:
    passed: list[str] = []
    failed: list[dict[str, str]] = []

    async def check(name: str, body: Callable[[], Awaitable[None]]) -> None:
        try:
            await body()
        except Exception as exc:
            failed.append({"check": name, "error": f"{type(exc).__name__}: {exc}"})
            print(f"FAIL {name}\n{traceback.format_exc()}", file=sys.stderr)
        else:
            passed.append(name)
            print(f"ok   {name}")

    alltypes, typed = targets["alltypes"], targets["typed"]
    every, typed_types = alltypes["datatypes"], typed["datatypes"]
    rest = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=30))
    base = f"http://{alltypes['http']}"
    typed_base = f"http://{typed['http']}"
    grpc_client = InferenceGRPCClient(alltypes["grpc"], timeout=30, retries=0)
    typed_grpc = InferenceGRPCClient(typed["grpc"], timeout=30, retries=0)

    async def rest_health() -> None:
        assert await rest.is_server_live(base) is True
        assert await rest.is_server_ready(base) is True
        assert await rest.is_model_ready(base, "alltypes") is True
        assert await rest.is_model_ready(base, "nothing") is False
        async with httpx.AsyncClient() as plain:
            metadata = (await plain.get(f"{base}/v2/models/alltypes")).json()
        assert metadata["name"] == "alltypes" and len(metadata["inputs"]) == len(every)

    async def rest_binary() -> None:
        request = InferRequest(
            "alltypes",
            numpy_inputs(every, binary=True),
            request_id="kserve-rest-1",
            parameters={"binary_data_output": True},
        )
        response = await rest.infer(base, request, model_name="alltypes")
        assert response.id == "kserve-rest-1", response.id
        check_echo(response, every)

    async def rest_json() -> None:
        request = InferRequest("alltypes", numpy_inputs(every, binary=False), request_id="kserve-rest-2")
        response = await rest.infer(base, request, model_name="alltypes")
        assert response.id == "kserve-rest-2"
        check_echo(response, every)
        listed = await rest.infer(typed_base, InferRequest("typed", list_inputs(typed_types)), model_name="typed")
        check_echo(listed, typed_types)

    async def rest_requested_outputs() -> None:
        wanted = ["BYTES", "INT16"]
        request = InferRequest(
            "alltypes",
            numpy_inputs(every, binary=False),
            request_outputs=[RequestedOutput(out_name(d), {"binary_data": d == "INT16"}) for d in wanted],
        )
        response = await rest.infer(base, request, model_name="alltypes")
        assert [o.name for o in response.outputs] == [out_name(d) for d in wanted]
        check_echo(response, wanted)

    async def rest_errors() -> None:
        try:
            await rest.infer(base, InferRequest("nothing", numpy_inputs(every, True)), model_name="nothing")
            raise AssertionError("unknown model answered")
        except httpx.HTTPStatusError as exc:
            assert exc.response.status_code == 404 and "nothing" in str(exc), exc
        wrong = numpy_inputs(every, binary=True)
        wrong[3] = InferInput(in_name("INT32"), [3, 2], "INT64")
        wrong[3].set_data_from_numpy(sample("INT64"))
        try:
            await rest.infer(base, InferRequest("alltypes", wrong), model_name="alltypes")
            raise AssertionError("wrong datatype answered")
        except httpx.HTTPStatusError as exc:
            assert exc.response.status_code == 400 and "in_int32" in str(exc), exc

    async def grpc_health() -> None:
        assert await grpc_client.is_server_live() is True
        assert await grpc_client.is_server_ready() is True
        assert await grpc_client.is_model_ready("alltypes") is True
        async with grpc.aio.insecure_channel(alltypes["grpc"]) as channel:
            metadata = await GRPCInferenceServiceStub(channel).ModelMetadata(ModelMetadataRequest(name="alltypes"))
        assert metadata.name == "alltypes" and [t.datatype for t in metadata.inputs] == every

    async def grpc_raw() -> None:
        request = InferRequest("alltypes", numpy_inputs(every, binary=True), request_id="kserve-grpc-1")
        response = await grpc_client.infer(request)
        assert response.id == "kserve-grpc-1" and response.model_version == "1"
        check_echo(response, every)
        versioned = InferRequest("alltypes", numpy_inputs(every, binary=True), model_version="1")
        check_echo(await grpc_client.infer(versioned), every)

    async def grpc_typed() -> None:
        request = InferRequest("typed", list_inputs(typed_types), request_id="kserve-grpc-2", parameters={"a": 1})
        response = await typed_grpc.infer(request)
        assert response.id == "kserve-grpc-2"
        check_echo(response, typed_types)

    async def grpc_requested_outputs() -> None:
        wanted = ["FP16", "UINT8"]
        request = InferRequest(
            "alltypes",
            numpy_inputs(every, binary=True),
            request_outputs=[RequestedOutput(out_name(d)) for d in wanted],
        )
        response = await grpc_client.infer(request)
        assert [o.name for o in response.outputs] == [out_name(d) for d in wanted]
        check_echo(response, wanted)

    async def grpc_errors() -> None:
        try:
            await grpc_client.infer(InferRequest("nothing", numpy_inputs(every, True)))
            raise AssertionError("unknown model answered")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
        wrong = numpy_inputs(every, binary=True)
        wrong[0] = InferInput(in_name("BOOL"), [3, 2], "UINT8")
        wrong[0].set_data_from_numpy(sample("UINT8"))
        try:
            await grpc_client.infer(InferRequest("alltypes", wrong))
            raise AssertionError("wrong datatype answered")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "in_bool" in (exc.details() or ""), exc

    try:
        for name, body in [
            ("rest health and metadata", rest_health),
            ("rest infer every datatype, binary", rest_binary),
            ("rest infer every datatype, JSON", rest_json),
            ("rest requested outputs", rest_requested_outputs),
            ("rest unknown model and wrong datatype", rest_errors),
            ("grpc health and metadata", grpc_health),
            ("grpc infer every datatype, raw", grpc_raw),
            ("grpc infer typed contents", grpc_typed),
            ("grpc requested outputs", grpc_requested_outputs),
            ("grpc unknown model and wrong datatype", grpc_errors),
        ]:
            await check(name, body)
    finally:
        await rest.close()
        await grpc_client.close()
        await typed_grpc.close()
    print(json.dumps({"passed": passed, "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(json.loads(sys.argv[1]))))
