"""Request values that do not fit their tensor's datatype are a 400 naming the input, the value and its position,
never a silently changed number (FP32 1e39 used to become inf, a gRPC INT8 300 became 44).

Over REST against the ``alltypes`` echo runtime and over gRPC typed contents against the ``typed`` one (real
processes, conftest.py): every other input of the request is the valid sample, so the only fault is the one value.
The JSON tokens NaN, Infinity and -Infinity are accepted for floating-point inputs, as Triton accepts them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from oip_echo import DATATYPES, TYPED_DATATYPES, EchoRuntime, input_name, output_name, sample
from tritonclient.grpc import service_pb2, service_pb2_grpc

# runtimes.tensors, not runtimes.grpc_codec: that one imports protos.inference_pb2, whose "inference" package clashes
# with tritonclient's in one process.
from runtimes.tensors import CONTENTS_FIELD

ROOT = Path(__file__).resolve().parents[2]


def _inputs(name: str, data: list[Any]) -> list[dict[str, Any]]:
    """Every datatype's sample input, with ``data`` (six values, shape [3, 2]) for input ``name``."""
    inputs = []
    for datatype in DATATYPES:
        values = sample(datatype).reshape(-1)
        listed = [v.decode() for v in values] if datatype == "BYTES" else values.tolist()
        tensor_name = input_name(datatype)
        chosen = data if tensor_name == name else listed
        inputs.append({"name": tensor_name, "datatype": datatype, "shape": [3, 2], "data": chosen})
    return inputs


def _post(runtime: EchoRuntime, body: bytes) -> httpx.Response:
    return httpx.post(f"http://{runtime.http_url}/v2/models/alltypes/infer", content=body, timeout=30)


def _body(name: str, data: list[Any]) -> bytes:
    # allow_nan: Python's json writes NaN/Infinity tokens, as tritonclient.http does.
    return json.dumps({"inputs": _inputs(name, data)}, allow_nan=True).encode()


#: name -> (input, its six values, what the error says).
OUT_OF_RANGE: dict[str, tuple[str, list[Any], str]] = {
    "FP32 above its largest": (
        "in_fp32",
        [1.0, 2.0, 3.0, 1e39, 5.0, 6.0],
        "input 'in_fp32': value 1e+39 at position 3 is outside the FP32 range",
    ),
    "FP32 below its lowest": (
        "in_fp32",
        [-1e39, 0.0, 0.0, 0.0, 0.0, 0.0],
        "input 'in_fp32': value -1e+39 at position 0 is outside the FP32 range",
    ),
    # Rounds up to infinity: just above FP32's largest plus half a unit in the last place.
    "FP32 just past rounding": (
        "in_fp32",
        [0.0, 3.4028235677973366e38, 0.0, 0.0, 0.0, 0.0],
        "value 3.4028235677973366e+38 at position 1 is outside the FP32 range",
    ),
    "FP16 integer": ("in_fp16", [70000, 0, 0, 0, 0, 0], "input 'in_fp16': value 70000 at position 0 is outside"),
    "FP16 float": ("in_fp16", [0.0, 0.0, 0.0, 0.0, 0.0, -65520.0], "value -65520.0 at position 5 is outside the FP16"),
    "FP64 number past its range": (
        "in_fp64",
        [0.0, 12345.5, 0.0, 0.0, 0.0, 0.0],
        "input 'in_fp64': the number at position 1 is outside the FP64 range",
    ),
    "INT8": ("in_int8", [0, 0, 300, 0, 0, 0], "input 'in_int8': value 300 at position 2 does not fit INT8"),
    "UINT8": ("in_uint8", [0, -1, 0, 0, 0, 0], "input 'in_uint8': value -1 at position 1 does not fit UINT8"),
    "UINT64 negative": ("in_uint64", [0, 0, 0, 0, 0, -1], "value -1 at position 5 does not fit UINT64"),
    "INT64 past its range": ("in_int64", [0, 0, 0, 2**63, 0, 0], "input 'in_int64'"),
    "BOOL as 1": ("in_bool", [True, 1, True, True, True, True], "input 'in_bool': BOOL data must be true/false"),
    "BOOL as a string": ("in_bool", ["true"] * 6, "input 'in_bool': BOOL data must be true/false"),
}


@pytest.mark.parametrize("case", list(OUT_OF_RANGE))
def test_rest_value_out_of_range_is_400_naming_it(alltypes: EchoRuntime, case: str) -> None:
    name, data, fragment = OUT_OF_RANGE[case]
    # json.dumps cannot write 1e400 (Python reads it as inf): the case holds a marker spelled over in the body.
    body = _body(name, data).replace(b"12345.5", b"1e400")
    response = _post(alltypes, body)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    assert fragment in response.json()["error"], response.text


def test_out_of_range_values_leave_no_warning_in_the_log(alltypes: EchoRuntime) -> None:
    """A value that overflows its datatype is the client's 400, not a numpy "overflow encountered in cast" warning on
    the runtime's stderr (once per process, naming no request)."""
    for case in ("FP32 above its largest", "FP16 integer", "FP16 float"):
        name, data, _ = OUT_OF_RANGE[case]
        assert _post(alltypes, _body(name, data)).status_code == 400
    assert "RuntimeWarning" not in alltypes.log(), alltypes.log()[-2000:]


def test_casts_that_lose_values_warn_nothing() -> None:
    """The casts whose lost values the runtime reports itself (an input past FP32's range is a 400, a NaN output
    declared INT64 a 500 naming it) leave no numpy RuntimeWarning on stderr either, with warnings shown."""
    script = (
        "import numpy as np\n"
        "from runtimes import tensors\n"
        "tensors.cast(np.array([1.0, float('nan')]), 'INT64')\n"
        "tensors.cast(np.array([1e39]), 'FP32')\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr


def test_rest_extremes_and_nan_infinity_tokens_are_accepted(alltypes: EchoRuntime) -> None:
    """The largest finite values pass; NaN, Infinity and -Infinity (tokens Triton also reads) stay what they are."""
    largest = float(np.finfo(np.float32).max)
    cases = {
        "in_fp32": [largest, -largest, float("nan"), float("inf"), float("-inf"), 1e-50],
        "in_fp16": [65504.0, -65504.0, float("nan"), float("inf"), float("-inf"), 65519.0],
        "in_fp64": [1.7976931348623157e308, float("nan"), float("inf"), float("-inf"), 0.0, 5e-324],
    }
    for name, data in cases.items():
        response = _post(alltypes, _body(name, data))
        assert response.status_code == 200, (name, response.text)
        outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
        got = np.array(outputs["out_" + name[len("in_") :]], dtype=np.float64)
        dtype = {"in_fp32": np.float32, "in_fp16": np.float16, "in_fp64": np.float64}[name]
        expected = np.array(data, dtype=np.float64).astype(dtype).astype(np.float64)
        np.testing.assert_array_equal(got, expected, err_msg=name)
    # The tokens as a client writes them by hand, too.
    hand = _body("in_fp32", [0.0] * 6).replace(b"[0.0, 0.0, 0.0", b"[NaN, Infinity, -Infinity", 1)
    response = _post(alltypes, hand)
    assert response.status_code == 200, response.text


def _typed_request(name: str, values: list[Any]) -> Any:
    """A typed-contents request for the ``typed`` echo model: the samples, with ``values`` for input ``name``."""
    request = service_pb2.ModelInferRequest(model_name="typed")
    for datatype in TYPED_DATATYPES:
        tensor = request.inputs.add(name=input_name(datatype), datatype=datatype, shape=[3, 2])
        data = sample(datatype).reshape(-1)
        listed = values if input_name(datatype) == name else (list(data) if datatype == "BYTES" else data.tolist())
        getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(listed)
    return request


@pytest.mark.parametrize(
    ("name", "values", "fragment"),
    [
        ("in_int8", [0, 0, 0, 300, 0, 0], "input 'in_int8': value 300 at position 3 does not fit INT8"),
        ("in_int8", [-129, 0, 0, 0, 0, 0], "input 'in_int8': value -129 at position 0 does not fit INT8"),
        ("in_int16", [0, 70000, 0, 0, 0, 0], "input 'in_int16': value 70000 at position 1 does not fit INT16"),
        ("in_uint8", [0, 0, 0, 0, 256, 0], "input 'in_uint8': value 256 at position 4 does not fit UINT8"),
        ("in_uint16", [0, 0, 0, 0, 0, 65536], "input 'in_uint16': value 65536 at position 5 does not fit UINT16"),
    ],
)
def test_grpc_typed_contents_out_of_range_is_invalid_argument(
    typed: EchoRuntime, name: str, values: list[int], fragment: str
) -> None:
    """int_contents and uint_contents are 32-bit: an INT8/INT16/UINT8/UINT16 value may not fit its datatype."""
    with grpc.insecure_channel(typed.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(_typed_request(name, values), timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in (raised.value.details() or ""), raised.value.details()
        # The types' own extremes still pass.
        edges = {"in_int8": [-128, 127], "in_int16": [-32768, 32767], "in_uint8": [0, 255], "in_uint16": [0, 65535]}
        fine = edges[name] + [0, 0, 0, 0]
        response = stub.ModelInfer(_typed_request(name, fine), timeout=30)
        output = next(o for o in response.outputs if o.name == output_name(name[len("in_") :].upper()))
        assert next(iter(output.contents.ListFields()))[1] == fine
