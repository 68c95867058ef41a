"""Hypothesis on the gRPC request decoder, in a process of its own (run by test_runtime_fuzz.py).

It imports protos.inference_pb2, which cannot share a process with tritonclient's copy of the `inference`
package, so it is a plain script (not a pytest module). Every ModelInferRequest, well-formed or not, must either
decode, validate, predict (echo) and encode, or fail with an InferenceError below 500.
Prints "N examples passed" and exits 0; any other outcome is a failure with hypothesis's minimal example.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from oip_echo import DATATYPES, ECHO_MODEL, input_name, output_name, sample, serving_yaml

from protos import inference_pb2 as pb
from runtimes.base import ModelRuntime
from runtimes.dataplane import DataPlane
from runtimes.errors import InferenceError
from runtimes.grpc_codec import (
    build_model_infer_response,
    parse_model_infer_request,
    uses_raw_inputs,
)
from runtimes.serving_config import parse_serving_config
from runtimes.tensors import CONTENTS_FIELD, encode_raw


class Echo(ModelRuntime):
    kind: ClassVar[str] = "python"

    def load(self) -> None:
        return None

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        namespace: dict[str, Any] = {}
        exec(ECHO_MODEL, namespace)
        result: dict[str, Any] = namespace["predict"](inputs)
        return result


PLANE = DataPlane(Echo(Path("."), parse_serving_config(serving_yaml(DATATYPES))), name="alltypes", version=1)
asyncio.run(PLANE.load())
COUNT = 0

int64s = st.integers(-(2**63), 2**63 - 1)
uint64s = st.integers(0, 2**64 - 1)
FIELD_VALUES = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": int64s,
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": uint64s,
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
    "bytes_contents": st.binary(max_size=6),
}


@st.composite
def requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="alltypes", id=draw(st.text(max_size=4)))
    raw = draw(st.booleans())
    for datatype in DATATYPES:
        if draw(st.integers(0, 10)) == 0:
            continue
        tensor = request.inputs.add(
            name=draw(st.just(input_name(datatype)) | st.text(max_size=3)),
            datatype=draw(st.just(datatype) | st.sampled_from([*DATATYPES, "", "X"])),
            shape=draw(st.just([3, 2]) | st.lists(int64s | st.integers(-1, 7), max_size=3)),
        )
        if draw(st.integers(0, 6)) == 0:
            tensor.parameters["binary_data_size"].int64_param = draw(int64s)
        data = sample(datatype)
        if raw:
            good = encode_raw(data, datatype)
            request.raw_input_contents.append(draw(st.just(good) | st.binary(max_size=60)))
            if draw(st.integers(0, 10)) == 0:
                tensor.contents.bool_contents.append(True)
        else:
            field = draw(st.just(CONTENTS_FIELD.get(datatype, "fp32_contents")) | st.sampled_from(list(FIELD_VALUES)))
            if field == CONTENTS_FIELD.get(datatype) and draw(st.booleans()):
                values = list(data.reshape(-1))
                if datatype != "BYTES":
                    values = data.reshape(-1).tolist()
            else:
                values = draw(st.lists(FIELD_VALUES[field], max_size=8))
            getattr(tensor.contents, field).extend(values)
    if raw and draw(st.integers(0, 8)) == 0:
        request.raw_input_contents.append(b"extra")
    for _ in range(draw(st.integers(0, 2))):
        request.outputs.add(name=draw(st.sampled_from([output_name(d) for d in DATATYPES] + ["nope", ""])))
    if draw(st.booleans()):
        request.parameters["p"].uint64_param = draw(uint64s)
    return request


def check(request: pb.ModelInferRequest) -> None:
    global COUNT
    COUNT += 1
    try:
        response = asyncio.run(PLANE.infer(parse_model_infer_request(request)))
        message = build_model_infer_response(response, raw=uses_raw_inputs(request))
        message.SerializeToString()
    except InferenceError as exc:
        assert exc.http_status < 500, f"{type(exc).__name__}: {exc}"


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=requests())
def fuzz_structured(request: pb.ModelInferRequest) -> None:
    check(request)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(wire=st.binary(max_size=300))
def fuzz_bytes(wire: bytes) -> None:
    try:
        request = pb.ModelInferRequest.FromString(wire)
    except DecodeError:
        return  # grpc answers an unparseable message itself (INTERNAL from the framework, before our code)
    check(request)


if __name__ == "__main__":
    fuzz_structured()
    fuzz_bytes()
    PLANE.shutdown_executor()
    print(f"{COUNT} examples passed")
