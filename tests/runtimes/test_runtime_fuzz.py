"""Bad input never yields a 5xx or a dead process.

Hypothesis drives the REST JSON decoder and the binary-data extension parser in-process (through the data plane
of an echo model with every datatype, and the response encoder), the gRPC request decoder in a subprocess
(grpc_decoder_fuzz.py: it imports protos.inference_pb2, which cannot share a process with tritonclient), and a
short run of all three over the wire against a real runtime. Named cases cover the classic mistakes.

Every answer to a bad request must be an InferenceError below 500 in-process, a 4xx with a JSON error over REST,
and a non-INTERNAL / non-UNKNOWN status over gRPC; the runtime must still be alive afterwards.
"""

from __future__ import annotations

import asyncio
import json
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import grpc
import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oip_echo import DATATYPES, ECHO_MODEL, EchoRuntime, input_name, output_name, sample, serving_yaml
from tritonclient.grpc import service_pb2, service_pb2_grpc

from runtimes.base import ModelRuntime
from runtimes.dataplane import DataPlane
from runtimes.errors import InferenceError
from runtimes.json_codec import encode_infer_response, parse_infer_request
from runtimes.serving_config import parse_serving_config

HEADER = "Inference-Header-Content-Length"
FUZZ_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
WIRE_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


class EchoRuntimeModel(ModelRuntime):
    """The echo model of oip_echo.py, in-process."""

    kind: ClassVar[str] = "python"

    def load(self) -> None:
        return None

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        namespace: dict[str, Any] = {}
        exec(ECHO_MODEL, namespace)
        result: dict[str, Any] = namespace["predict"](inputs)
        return result


@pytest.fixture(scope="module")
def plane() -> Iterator[DataPlane]:
    runtime = EchoRuntimeModel(Path("."), parse_serving_config(serving_yaml(DATATYPES)))
    dataplane = DataPlane(runtime, name="alltypes", version=1)
    asyncio.run(dataplane.load())
    yield dataplane
    dataplane.shutdown_executor()


def _answer(plane: DataPlane, body: bytes, header_length: str | None = None) -> int:
    """The HTTP status the runtime would answer ``body`` with (the REST app maps InferenceError the same way)."""
    try:
        request = parse_infer_request(body, "alltypes", "", header_length)
        response = asyncio.run(plane.infer(request))
        encode_infer_response(response, request)
    except InferenceError as exc:
        assert exc.http_status < 500, f"{type(exc).__name__}: {exc}"
        return exc.http_status
    return 200


# -- strategies -------------------------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
)
datatypes = st.sampled_from([*DATATYPES, "FP8", "", "fp32", "STRING"])
dims = st.integers(min_value=-2, max_value=4) | st.sampled_from([2**31, 2**62, 2**63 - 1, 2**64])
shapes = st.lists(dims, max_size=3) | json_values


@st.composite
def tensors(draw: st.DrawFn) -> dict[str, Any]:
    """An input that is often right in most fields and wrong in one or two."""
    datatype = draw(st.sampled_from(DATATYPES))
    good = sample(datatype)
    tensor: dict[str, Any] = {
        "name": draw(st.sampled_from([input_name(datatype), input_name(datatype), "x", ""])),
        "datatype": draw(st.just(datatype) | datatypes),
        "shape": draw(st.just([3, 2]) | shapes),
    }
    json_good = [v.decode() for v in good.reshape(-1)] if datatype == "BYTES" else good.reshape(-1).tolist()
    data = draw(st.just(json_good) | st.lists(json_scalars, max_size=8) | json_values)
    if draw(st.booleans()):
        tensor["data"] = data
    if draw(st.booleans()):
        tensor["parameters"] = draw(st.dictionaries(st.sampled_from(["binary_data_size", "x"]), json_values))
    return tensor


def _valid_inputs() -> list[dict[str, Any]]:
    inputs = []
    for datatype in DATATYPES:
        data = sample(datatype).reshape(-1)
        values = [v.decode() for v in data] if datatype == "BYTES" else data.tolist()
        inputs.append({"name": input_name(datatype), "datatype": datatype, "shape": [3, 2], "data": values})
    return inputs


@st.composite
def documents(draw: st.DrawFn) -> Any:
    """Request documents: a valid request with some inputs replaced or broken, or anything JSON."""
    if draw(st.integers(0, 4)) == 0:
        return draw(json_values)
    inputs: list[Any] = _valid_inputs()
    for _ in range(draw(st.integers(1, 3))):
        index = draw(st.integers(0, len(inputs)))
        choice = draw(st.integers(0, 2))
        if choice == 0:
            inputs.insert(index, draw(tensors()))
        elif choice == 1 and index < len(inputs):
            del inputs[index]
        elif index < len(inputs):
            inputs[index] = draw(tensors() | json_values)
    document: dict[str, Any] = {"inputs": inputs}
    if draw(st.booleans()):
        document["outputs"] = draw(
            st.lists(st.fixed_dictionaries({"name": st.sampled_from([output_name("FP16"), "y", ""])}) | json_values)
        )
    if draw(st.booleans()):
        document["id"] = draw(json_values)
    if draw(st.booleans()):
        document["parameters"] = draw(json_values)
    return document


def _dumps(document: Any) -> bytes:
    return json.dumps(document, allow_nan=True).encode()


@st.composite
def binary_bodies(draw: st.DrawFn) -> tuple[bytes, str]:
    """A binary-extension body: a JSON header announcing binary inputs, then bytes that may or may not fit."""
    inputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for datatype in DATATYPES:
        raw = _raw(sample(datatype), datatype)
        if draw(st.integers(0, 5)) == 0:
            raw = draw(st.binary(max_size=64))
        size: Any = len(raw)
        if draw(st.integers(0, 6)) == 0:
            size = draw(st.integers(-2, 100) | json_values)
        inputs.append(
            {
                "name": input_name(datatype),
                "datatype": datatype,
                "shape": [3, 2],
                "parameters": {"binary_data_size": size},
            }
        )
        blobs.append(raw)
    header = _dumps({"inputs": inputs, "parameters": {"binary_data_output": draw(st.booleans())}})
    body = header + b"".join(blobs)
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(body)))
        body = body[:cut] + draw(st.binary(max_size=16))
    length = draw(
        st.just(str(len(header))) | st.integers(-5, len(body) + 5).map(str) | st.text("0123456789+-_x", max_size=4)
    )
    return body, length


def _raw(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in array.reshape(-1))
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


# -- in-process -------------------------------------------------------------------------------------------------


def test_valid_requests_pass(plane: DataPlane) -> None:
    assert _answer(plane, _dumps({"inputs": _valid_inputs()})) == 200
    header = _dumps(
        {
            "inputs": [
                {
                    "name": input_name(d),
                    "datatype": d,
                    "shape": [3, 2],
                    "parameters": {"binary_data_size": len(_raw(sample(d), d))},
                }
                for d in DATATYPES
            ]
        }
    )
    body = header + b"".join(_raw(sample(d), d) for d in DATATYPES)
    assert _answer(plane, body, str(len(header))) == 200


@FUZZ_SETTINGS
@given(document=documents())
def test_fuzz_json_decoder(plane: DataPlane, document: Any) -> None:
    _answer(plane, _dumps(document))


@FUZZ_SETTINGS
@given(body=st.binary(max_size=200) | st.text(max_size=100).map(str.encode))
def test_fuzz_json_decoder_raw_bytes(plane: DataPlane, body: bytes) -> None:
    _answer(plane, body)


@FUZZ_SETTINGS
@given(case=binary_bodies())
def test_fuzz_binary_extension(plane: DataPlane, case: tuple[bytes, str]) -> None:
    body, length = case
    _answer(plane, body, length)


def test_grpc_decoder_fuzz_in_subprocess() -> None:
    """Hypothesis on parse_model_infer_request and build_model_infer_response (see grpc_decoder_fuzz.py)."""
    script = Path(__file__).with_name("grpc_decoder_fuzz.py")
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2]
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    # Every structured example (300) reaches the decoder; so do the random byte strings that parse.
    passed = re.search(r"^(\d+) examples passed$", result.stdout, re.MULTILINE)
    assert passed is not None and int(passed[1]) >= 300, result.stdout


# -- named cases ------------------------------------------------------------------------------------------------


def _named_cases() -> dict[str, tuple[bytes, str | None, str]]:
    valid = _valid_inputs()
    bytes_input = {"name": "in_bytes", "datatype": "BYTES", "shape": [3, 2], "parameters": {"binary_data_size": 10}}
    bad_prefix = struct.pack("<I", 1000) + b"abcdef"  # announces 1000 bytes, 6 follow
    bytes_header = _dumps({"inputs": [*valid[:-1], bytes_input]})
    fp32 = {"name": "in_fp32", "datatype": "FP32", "shape": [3, 2], "parameters": {"binary_data_size": 24}}
    others = [t for t in valid if t["name"] != "in_fp32"]
    fp32_header = _dumps({"inputs": [*others, fp32]})
    return {
        "missing input": (_dumps({"inputs": valid[1:]}), None, "missing input 'in_bool'"),
        "shape/data length mismatch": (
            _dumps({"inputs": [{**valid[0], "shape": [4, 2]}, *valid[1:]]}),
            None,
            "'in_bool' has 6 data elements",
        ),
        "empty data, impossible shape": (
            _dumps({"inputs": [{**valid[0], "shape": [0, 2**62], "data": []}, *valid[1:]]}),
            None,
            "'in_bool'",
        ),
        "truncated binary payload": (fp32_header + b"\0" * 20, str(len(fp32_header)), "binary_data_size"),
        "BYTES with bad length prefix": (bytes_header + bad_prefix[:10], str(len(bytes_header)), "in_bytes"),
        "BYTES cut inside a length prefix": (
            _dumps({"inputs": [*valid[:-1], {**bytes_input, "parameters": {"binary_data_size": 3}}]}) + b"\x01\x00\x00",
            None,
            "",
        ),
        "deeply nested JSON": (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, ""),
        "deeply nested data": (
            _dumps({"inputs": [{**valid[0], "data": json.loads("[" * 200 + "]" * 200)}, *valid[1:]]}),
            None,
            "'in_bool'",
        ),
        "header length beyond body": (b'{"inputs": []}', "1000", HEADER),
        "numbers as strings": (_replace_data(valid, "in_int32", ["1", "2", "3", "4", "5", "6"]), None, "strings"),
        "fractions for an integer type": (_replace_data(valid, "in_int16", [0.5] * 6), None, "'in_int16'"),
        "value out of range": (_replace_data(valid, "in_uint8", [256, 0, 0, 0, 0, 0]), None, "UINT8"),
        "null in a float tensor": (_replace_data(valid, "in_fp64", [None] * 6), None, "'in_fp64'"),
        "classification requested": (
            _dumps({"inputs": valid, "outputs": [{"name": "out_fp32", "parameters": {"classification": 2}}]}),
            None,
            "classification",
        ),
        "output in a shared-memory region": (
            _dumps({"inputs": valid, "outputs": [{"name": "out_fp32", "parameters": {"shared_memory_region": "r"}}]}),
            None,
            "output 'out_fp32': the shared-memory extension is not supported",
        ),
        "input in a shared-memory region": (
            _dumps(
                {
                    "inputs": [
                        {k: v for k, v in valid[0].items() if k != "data"}
                        | {"parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 6}},
                        *valid[1:],
                    ]
                }
            ),
            None,
            "input 'in_bool': the shared-memory extension is not supported",
        ),
        "lone surrogate in BYTES JSON text": (
            _dumps({"inputs": valid}).replace(b'"hydro"', b'"\\udc80"'),
            None,
            "'in_bytes': BYTES data is not valid Unicode",
        ),
    }


def _replace_data(inputs: list[dict[str, Any]], name: str, data: list[Any]) -> bytes:
    return _dumps({"inputs": [{**t, "data": data} if t["name"] == name else t for t in inputs]})


NAMED = _named_cases()


@pytest.mark.parametrize("case", list(NAMED))
def test_named_bad_requests_in_process(plane: DataPlane, case: str) -> None:
    body, length, fragment = NAMED[case]
    try:
        request = parse_infer_request(body, "alltypes", "", length)
        response = asyncio.run(plane.infer(request))
        encode_infer_response(response, request)
    except InferenceError as exc:
        assert exc.http_status == 400, exc
        assert fragment in str(exc), str(exc)
    else:
        raise AssertionError(f"{case}: accepted")


# -- over the wire ----------------------------------------------------------------------------------------------


def _post(runtime: EchoRuntime, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"http://{runtime.http_url}/v2/models/alltypes/infer", content=body, headers=headers, timeout=30)


def _assert_client_error(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]


@pytest.mark.parametrize("case", list(NAMED))
def test_named_bad_requests_over_rest(alltypes: EchoRuntime, case: str) -> None:
    body, length, fragment = NAMED[case]
    response = _post(alltypes, body, {HEADER: length} if length is not None else None)
    _assert_client_error(response)
    assert response.status_code == 400 and fragment in response.json()["error"], response.text


def test_oversized_bodies(alltypes: EchoRuntime) -> None:
    """The echo runtimes run with --max-message-mb 4."""
    big = b"x" * (5 * 2**20)
    response = _post(alltypes, big)
    assert response.status_code == 413 and "limit" in response.json()["error"], response.text
    # No Content-Length: the limit is enforced while streaming.
    chunked = httpx.post(
        f"http://{alltypes.http_url}/v2/models/alltypes/infer", content=iter([big[: 2**20]] * 5), timeout=30
    )
    assert chunked.status_code == 413, chunked.text
    request = service_pb2.ModelInferRequest(model_name="alltypes", raw_input_contents=[big])
    with grpc.insecure_channel(alltypes.grpc_url) as channel:
        with pytest.raises(grpc.RpcError) as error:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in (error.value.details() or ""), error.value.details()


@WIRE_SETTINGS
@given(document=documents())
def test_fuzz_rest_json_over_the_wire(alltypes: EchoRuntime, document: Any) -> None:
    _assert_client_error(_post(alltypes, _dumps(document)))


@WIRE_SETTINGS
@given(case=binary_bodies())
def test_fuzz_rest_binary_over_the_wire(alltypes: EchoRuntime, case: tuple[bytes, str]) -> None:
    body, length = case
    _assert_client_error(_post(alltypes, body, {HEADER: length}))


@st.composite
def grpc_requests(draw: st.DrawFn) -> bytes:
    """Serialized ModelInferRequests (tritonclient's wire-compatible message), sometimes with bytes flipped."""
    request = service_pb2.ModelInferRequest(model_name=draw(st.sampled_from(["alltypes", "alltypes", "x"])))
    raw = draw(st.booleans())
    for datatype in DATATYPES:
        if draw(st.integers(0, 8)) == 0:
            continue
        tensor = request.inputs.add(
            name=input_name(datatype),
            datatype=draw(st.just(datatype) | st.sampled_from([*DATATYPES, "X"])),
            shape=draw(st.just([3, 2]) | st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3)),
        )
        data = sample(datatype)
        if raw:
            request.raw_input_contents.append(draw(st.just(_raw(data, datatype)) | st.binary(max_size=40)))
        elif datatype == "BYTES":
            tensor.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=5), max_size=8)))
        else:
            tensor.contents.int64_contents.extend(draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=8)))
            if draw(st.booleans()):
                tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=6)))
    if draw(st.booleans()):
        request.outputs.add(name=draw(st.sampled_from([output_name("INT8"), "nope"])))
    wire = request.SerializeToString()
    if draw(st.booleans()) and wire:
        position = draw(st.integers(0, len(wire) - 1))
        wire = wire[:position] + bytes([draw(st.integers(0, 255))]) + wire[position + 1 :]
    return wire


@WIRE_SETTINGS
@given(wire=grpc_requests() | st.binary(max_size=100))
def test_fuzz_grpc_over_the_wire(alltypes: EchoRuntime, wire: bytes) -> None:
    with grpc.insecure_channel(alltypes.grpc_url) as channel:
        # Raw bytes in, raw bytes out: the runtime's own protobuf parser sees exactly what hypothesis made.
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        try:
            call(wire, timeout=30)
        except grpc.RpcError as error:
            assert error.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), error.details()


def test_runtime_alive_after_fuzzing(alltypes: EchoRuntime) -> None:
    assert alltypes.process.running, alltypes.log()
    assert httpx.get(f"http://{alltypes.http_url}/v2/health/ready").status_code == 200
    assert "Traceback" not in alltypes.log(), alltypes.log()


def test_empty_tensor_with_absurd_dimensions() -> None:
    """[0, 2**64] has no elements, like its data, but numpy cannot make it: 400, not 500."""
    yaml = (
        "runtime: python\nentrypoint: model:predict\nsignature:\n"
        "  inputs: [{name: in_fp32, datatype: FP32, shape: [-1, -1]}]\n"
        "  outputs: [{name: out_fp32, datatype: FP32, shape: [-1, -1]}]\n"
    )
    dataplane = DataPlane(EchoRuntimeModel(Path("."), parse_serving_config(yaml)), name="wild", version=1)
    asyncio.run(dataplane.load())
    try:
        for shape in ([0, 2**64], [0, 2**62], [2**63 - 1, 0, 2**63 - 1]):
            body = _dumps({"inputs": [{"name": "in_fp32", "datatype": "FP32", "shape": shape, "data": []}]})
            with pytest.raises(InferenceError) as error:
                asyncio.run(dataplane.infer(parse_infer_request(body, "wild", "")))
            assert error.value.http_status == 400 and "'in_fp32'" in str(error.value), error.value
    finally:
        dataplane.shutdown_executor()
