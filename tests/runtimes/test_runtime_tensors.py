"""Tensor encodings (runtimes/tensors.py) and HTTP/JSON bodies with binary data (runtimes/json_codec.py)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from runtimes import json_codec
from runtimes.errors import InvalidInput
from runtimes.messages import InferRequest, InferResponse, OutputTensor, RequestedOutput
from runtimes.tensors import (
    DATATYPES,
    cast,
    datatype_of,
    decode_json_data,
    decode_raw,
    encode_json_data,
    encode_raw,
    numpy_dtype,
    zeros,
)


def test_datatypes_match_the_schema() -> None:
    from protos.topology.models import DATATYPES as SCHEMA_DATATYPES

    assert set(DATATYPES) == set(SCHEMA_DATATYPES)
    for datatype in DATATYPES:
        assert datatype_of(numpy_dtype(datatype)) == datatype
    assert datatype_of(np.dtype("U3")) == "BYTES"


def test_unknown_datatype() -> None:
    with pytest.raises(InvalidInput, match="FP8"):
        numpy_dtype("FP8")


@pytest.mark.parametrize("datatype", [d for d in DATATYPES if d != "BYTES"])
def test_raw_round_trip(datatype: str) -> None:
    array = np.arange(6).reshape(2, 3).astype(numpy_dtype(datatype))
    raw = encode_raw(array, datatype)
    assert len(raw) == 6 * numpy_dtype(datatype).itemsize
    decoded = decode_raw("t", datatype, raw)
    assert decoded.dtype == numpy_dtype(datatype)
    assert decoded.tolist() == array.ravel().tolist()
    decoded[0] = decoded[1]  # writable: models may work in place


def test_raw_is_little_endian() -> None:
    assert encode_raw(np.array([1], dtype=np.int32), "INT32") == b"\x01\x00\x00\x00"
    assert decode_raw("t", "INT32", b"\x00\x01\x00\x00").tolist() == [256]


def test_raw_bytes_length_prefixed() -> None:
    array = np.array([b"ab", b"", "ç"], dtype=object)
    raw = encode_raw(array, "BYTES")
    assert raw == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0) + struct.pack("<I", 2) + "ç".encode()
    assert decode_raw("t", "BYTES", raw).tolist() == [b"ab", b"", "ç".encode()]
    with pytest.raises(InvalidInput, match=r"'t'.*truncated"):
        decode_raw("t", "BYTES", raw[:-1])
    with pytest.raises(InvalidInput, match=r"'t'.*truncated"):
        decode_raw("t", "BYTES", b"\x01\x00")


def test_raw_partial_element() -> None:
    with pytest.raises(InvalidInput, match=r"'t': 6 bytes .* FP32"):
        decode_raw("t", "FP32", b"\x00" * 6)


def test_json_data_flat_and_nested() -> None:
    assert decode_json_data("t", "FP32", [[1, 2], [3, 4]]).tolist() == [1, 2, 3, 4]
    assert decode_json_data("t", "INT64", [1, 2, 3]).dtype == np.int64
    assert decode_json_data("t", "BOOL", [True, False]).tolist() == [True, False]
    assert decode_json_data("t", "BYTES", [["a", "b"], ["c"]]).tolist() == [b"a", b"b", b"c"]


@pytest.mark.parametrize(
    ("datatype", "data"),
    [("FP32", [[1, 2], [3]]), ("INT64", ["x"]), ("INT8", [1000]), ("BYTES", [1, 2]), ("FP64", {"a": 1})],
)
def test_json_data_invalid(datatype: str, data: object) -> None:
    with pytest.raises(InvalidInput, match="'t'"):
        decode_json_data("t", datatype, data)


def test_encode_json_data() -> None:
    assert encode_json_data(np.array([[1.5, 2.0]], dtype=np.float32)) == [1.5, 2.0]
    assert encode_json_data(np.array([b"x", "y"], dtype=object)) == ["x", "y"]


def test_cast_and_zeros() -> None:
    assert cast([1.9, 2.1], "INT64").tolist() == [1, 2]
    assert cast(np.array([["a"]]), "BYTES").tolist() == [[b"a"]]
    with pytest.raises(ValueError):
        cast(["nope"], "FP32")
    assert zeros("FP64", [1, 4]).shape == (1, 4)
    assert zeros("BYTES", [2]).tolist() == [b"", b""]


# -- HTTP bodies -----------------------------------------------------------------------------------------------


def _binary_body(header: dict[str, object], *blobs: bytes) -> tuple[bytes, str]:
    text = json.dumps(header).encode()
    return text + b"".join(blobs), str(len(text))


def test_parse_json_request() -> None:
    body = json.dumps(
        {
            "id": "r1",
            "parameters": {"binary_data_output": True},
            "inputs": [{"name": "a", "shape": [2], "datatype": "FP32", "data": [1, 2]}],
            "outputs": [{"name": "y", "parameters": {"binary_data": False}}],
        }
    ).encode()
    request = json_codec.parse_infer_request(body, "m", "")
    assert (request.model_name, request.model_version, request.id) == ("m", "", "r1")
    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("a", "FP32", (2,))
    assert tensor.data.decode("a", "FP32").tolist() == [1, 2]
    assert request.outputs == [RequestedOutput("y", {"binary_data": False})]


def test_parse_binary_request() -> None:
    a = np.array([1, 2, 3], dtype="<f4").tobytes()
    b = struct.pack("<I", 2) + b"hi"
    body, length = _binary_body(
        {
            "inputs": [
                {"name": "a", "shape": [3], "datatype": "FP32", "parameters": {"binary_data_size": len(a)}},
                {"name": "j", "shape": [1], "datatype": "INT64", "data": [7]},
                {"name": "b", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(b)}},
            ]
        },
        a,
        b,
    )
    request = json_codec.parse_infer_request(body, "m", "1", length)
    decoded = [t.data.decode(t.name, t.datatype).tolist() for t in request.inputs]
    assert decoded == [[1, 2, 3], [7], [b"hi"]]


@pytest.mark.parametrize(
    ("header", "blob", "length", "fragment"),
    [
        ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]},
         b"\x00" * 4, None, "binary_data_size is 8"),
        ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]},
         b"\x00" * 6, None, "add up to 4"),
        ({"inputs": []}, b"", "999", "Inference-Header-Content-Length is 999"),
        ({"inputs": []}, b"", "x", "must be an integer"),
        ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32"}]}, b"", None, "input 'a' has no 'data'"),
        ({"inputs": [{"name": "a", "shape": [True], "datatype": "FP32", "data": [1]}]}, b"", None, "'shape'"),
        ({"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}, b"", None, "inputs[0]: 'name'"),
        ({"inputs": [{"name": "a", "shape": [1], "data": [1]}]}, b"", None, "input 'a': 'datatype'"),
        ({"inputs": [], "outputs": {}}, b"", None, "'outputs' must be a list"),
        ({"inputs": [], "id": 5}, b"", None, "'id'"),
        ({"inputs": [], "parameters": {"p": [1]}}, b"", None, "parameter 'p'"),
    ],
)  # fmt: skip
def test_parse_request_errors(header: dict[str, object], blob: bytes, length: str | None, fragment: str) -> None:
    body, real_length = _binary_body(header, blob)
    with pytest.raises(InvalidInput) as error:
        json_codec.parse_infer_request(body, "m", "", length or (real_length if blob else None))
    assert fragment in str(error.value)


def _response() -> InferResponse:
    return InferResponse(
        "m",
        "2",
        [
            OutputTensor("label", "INT64", np.array([0, 1], dtype=np.int64)),
            OutputTensor("text", "BYTES", np.array([b"a", b"bc"], dtype=object)),
        ],
        id="r9",
    )


def test_encode_json_response() -> None:
    request = InferRequest("m", "", [])
    encoded = json_codec.encode_infer_response(_response(), request)
    assert encoded.media_type == "application/json" and not encoded.headers
    assert json.loads(encoded.body) == {
        "model_name": "m",
        "model_version": "2",
        "id": "r9",
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [2], "data": [0, 1]},
            {"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a", "bc"]},
        ],
    }


def test_encode_binary_response() -> None:
    # Request-wide binary output, overridden to JSON for one output.
    request = InferRequest(
        "m",
        "",
        [],
        outputs=[RequestedOutput("text", {"binary_data": False}), RequestedOutput("label")],
        parameters={"binary_data_output": True},
    )
    encoded = json_codec.encode_infer_response(_response(), request)
    length = int(encoded.headers[json_codec.HEADER_LENGTH])
    header = json.loads(encoded.body[:length])
    label, text = header["outputs"]
    assert label["parameters"] == {"binary_data_size": 16} and "data" not in label
    assert text["data"] == ["a", "bc"]
    assert np.frombuffer(encoded.body[length:], dtype="<i8").tolist() == [0, 1]
