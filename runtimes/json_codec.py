"""HTTP/JSON inference bodies, including Triton's binary-data extension.

A request body is JSON, or (when the ``Inference-Header-Content-Length`` header is set) a JSON header of that many
bytes followed by the raw data of every input whose ``parameters.binary_data_size`` is set, in input order.
Outputs go back as raw data when the request asks for it: ``parameters.binary_data`` on a requested output, or
the request parameter ``binary_data_output`` for outputs without their own setting. tritonclient.http does both
by default.

Every string of a parsed request is Unicode text and every shape dimension an int64: JSON escapes can spell lone
surrogates ("\\ud800"), which have no UTF-8 form, and JSON numbers have no size limit, but protobuf (the pipeline's
stage calls, gRPC, span export) carries neither; such an id, name, datatype, parameter or shape is refused here,
naming the field, rather than failing later as a server error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from runtimes.errors import InvalidInput
from runtimes.messages import (
    SHARED_MEMORY_REGION,
    InferRequest,
    InferResponse,
    ModelMetadata,
    Parameters,
    RequestedOutput,
    RequestInput,
    TensorData,
    shared_memory_refused,
)
from runtimes.tensors import (
    INT64_MAX,
    INT64_MIN,
    JsonConstant,
    JsonData,
    RawData,
    encode_json_data,
    encode_raw,
)

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_SIZE = "binary_data_size"


@dataclass(frozen=True)
class EncodedResponse:
    """A response body and the headers that describe it."""

    body: bytes
    media_type: str
    headers: dict[str, str]


#: NaN, Infinity and -Infinity (which Triton reads too) come back as JsonConstant, telling them from a number past
#: FP64's range that also reads as infinity. One decoder: json.loads with parse_constant would build one per call.
_DECODER = json.JSONDecoder(parse_constant=JsonConstant)


def _parse_json(text: bytes | memoryview, what: str) -> Any:
    try:
        data = bytes(text)
        # What json.loads does with bytes: UTF-8 (or UTF-16/32 by their byte order marks) to str.
        return _DECODER.decode(data.decode(json.detect_encoding(data), "surrogatepass"))
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{what} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:
        # A number of more digits than Python converts (sys.get_int_max_str_digits(), 4300 by default).
        raise InvalidInput(f"{what} cannot be read: {exc}") from None
    except RecursionError:
        # The decoder recurses once per nesting level: thousands of "[" exhaust the stack before any tensor does.
        raise InvalidInput(f"{what} is nested too deeply to be an inference request") from None


def _text(value: str, what: str) -> str:
    """``value``, if it is Unicode text (has a UTF-8 form); else InvalidInput naming ``what``."""
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError as exc:
            surrogate = f"\\u{ord(value[exc.start]):04x}"
            raise InvalidInput(
                f"{what} is not valid Unicode text: it holds the lone surrogate {surrogate} at character {exc.start}"
            ) from None
    return value


def _parameters(raw: object, where: str) -> Parameters:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidInput(f"{where}: 'parameters' must be an object")
    for key, value in raw.items():
        if not isinstance(value, bool | int | float | str):
            raise InvalidInput(f"{where}: parameter {key!r} must be a boolean, number or string")
        _text(key, f"{where}: a parameter's name")
        if type(value) is str:
            _text(value, f"{where}: parameter {key!r}")
    return raw


def _string(obj: dict[str, Any], key: str, where: str, required: bool = True) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise InvalidInput(f"{where}: {key!r} must be a non-empty string")
    return _text(value, f"{where}: {key!r}")


def _shape(obj: dict[str, Any], where: str) -> tuple[int, ...]:
    shape = obj.get("shape")
    # bool is an int in Python, but never a dimension.
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise InvalidInput(f"{where}: 'shape' must be a list of integers")
    for dimension in shape:
        if not INT64_MIN <= dimension <= INT64_MAX:
            raise InvalidInput(f"{where}: 'shape' has a dimension outside the 64-bit integer range: {dimension}")
    return tuple(shape)


def parse_infer_request(
    body: bytes, model_name: str, model_version: str, header_length: str | None = None
) -> InferRequest:
    """Decode an HTTP inference request body (JSON, or JSON header plus binary data)."""
    binary = memoryview(b"")
    header: bytes | memoryview = body
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            raise InvalidInput(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 < length <= len(body):
            raise InvalidInput(f"{HEADER_LENGTH} is {length}, but the request body has {len(body)} bytes")
        view = memoryview(body)
        header, binary = view[:length], view[length:]
    if not len(header):
        raise InvalidInput("the request body is empty; send a JSON object with an 'inputs' list")
    document = _parse_json(header, "the request body")
    if not isinstance(document, dict):
        raise InvalidInput("the request body must be a JSON object with an 'inputs' list")
    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list):
        raise InvalidInput("the request body has no 'inputs' list")

    inputs: list[RequestInput] = []
    offset = 0
    for index, raw in enumerate(raw_inputs):
        where = f"inputs[{index}]"
        if not isinstance(raw, dict):
            raise InvalidInput(f"{where} must be an object with name, shape, datatype and data")
        name = _string(raw, "name", where)
        where = f"input {name!r}"
        datatype = _string(raw, "datatype", where)
        shape = _shape(raw, where)
        parameters = _parameters(raw.get("parameters"), where)
        size = parameters.get(BINARY_SIZE)
        data: TensorData
        if size is not None:
            if type(size) is not int or size < 0:
                raise InvalidInput(f"{where}: {BINARY_SIZE} must be a non-negative integer")
            if offset + size > len(binary):
                raise InvalidInput(
                    f"{where}: {BINARY_SIZE} is {size}, but only {len(binary) - offset} bytes of binary data are left"
                )
            data = RawData(binary[offset : offset + size])
            offset += size
        elif "data" in raw:
            data = JsonData(raw["data"])
        elif SHARED_MEMORY_REGION in parameters:
            raise shared_memory_refused(where)
        else:
            raise InvalidInput(f"{where} has no 'data' (and no {BINARY_SIZE} parameter)")
        inputs.append(RequestInput(name, datatype, shape, data, parameters))
    if offset != len(binary):
        raise InvalidInput(
            f"the request has {len(binary)} bytes of binary data, but its inputs' {BINARY_SIZE} add up to {offset}"
        )

    outputs: list[RequestedOutput] = []
    raw_outputs = document.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise InvalidInput("'outputs' must be a list")
        for index, raw in enumerate(raw_outputs):
            if not isinstance(raw, dict):
                raise InvalidInput(f"outputs[{index}] must be an object with a name")
            name = _string(raw, "name", f"outputs[{index}]")
            outputs.append(RequestedOutput(name, _parameters(raw.get("parameters"), f"output {name!r}")))

    request_id = document.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    _text(request_id, "'id'")
    return InferRequest(
        model_name=model_name,
        model_version=model_version,
        inputs=inputs,
        outputs=outputs,
        id=request_id,
        parameters=_parameters(document.get("parameters"), "the request"),
    )


def _binary_outputs(request: InferRequest) -> tuple[bool, dict[str, bool]]:
    default = request.parameters.get("binary_data_output") is True
    per_output = {o.name: o.parameters["binary_data"] is True for o in request.outputs if "binary_data" in o.parameters}
    return default, per_output


def encode_infer_response(response: InferResponse, request: InferRequest) -> EncodedResponse:
    """Encode a response: all JSON, or a JSON header followed by the outputs the client wanted as binary."""
    default_binary, per_output = _binary_outputs(request)
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for tensor in response.outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if per_output.get(tensor.name, default_binary):
            blob = encode_raw(tensor.data, tensor.datatype)
            entry["parameters"] = {BINARY_SIZE: len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = encode_json_data(tensor.data)
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        document["id"] = response.id
    document["outputs"] = outputs
    header = dumps(document)
    if not blobs:
        return EncodedResponse(header, "application/json", {})
    return EncodedResponse(b"".join([header, *blobs]), "application/octet-stream", {HEADER_LENGTH: str(len(header))})


def encode_metadata(metadata: ModelMetadata) -> dict[str, Any]:
    """Model metadata as the REST API returns it."""

    def tensors(specs: list[Any]) -> list[dict[str, Any]]:
        return [{"name": s.name, "datatype": s.datatype, "shape": s.shape} for s in specs]

    return {
        "name": metadata.name,
        "versions": metadata.versions,
        "platform": metadata.platform,
        "inputs": tensors(metadata.inputs),
        "outputs": tensors(metadata.outputs),
    }


#: Triton's model-config DataType name for each protocol datatype (Triton calls BYTES TYPE_STRING).
CONFIG_DATATYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
}


def encode_model_config(metadata: ModelMetadata) -> dict[str, Any]:
    """The model's configuration as Triton's REST ``/config`` returns it (a subset of Triton's ModelConfig).

    ``max_batch_size`` is 0: the signature's shapes are complete (a batch dimension, if any, is written as -1), so
    ``dims`` are the full shapes, as Triton reports models without its own batching.
    """

    def tensors(specs: list[Any]) -> list[dict[str, Any]]:
        return [{"name": s.name, "data_type": CONFIG_DATATYPES[s.datatype], "dims": s.shape} for s in specs]

    return {
        "name": metadata.name,
        "platform": metadata.platform,
        "backend": metadata.platform,
        "max_batch_size": 0,
        "input": tensors(metadata.inputs),
        "output": tensors(metadata.outputs),
    }


def dumps(document: object) -> bytes:
    """Compact JSON bytes.

    A model may output NaN or infinity; they are written as NaN/Infinity (as Python's json and tritonclient read
    them) rather than failing the request, although strict JSON parsers reject them. A lone surrogate (valid in a
    JSON escape, e.g. "\\udc80" in a client's string an error message quotes, but not encodable as UTF-8) is written
    back as its escape.
    """
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "backslashreplace")
