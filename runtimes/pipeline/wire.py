"""Tensors as they travel between stages: name, datatype, shape and raw little-endian bytes.

A stage's raw outputs become the next stage's raw inputs unchanged, so the pipeline never decodes what it only
passes along; only the client's inputs and the final outputs are converted, by the runtimes' own codecs. Each
stage's answer is checked on arrival (its bytes must fit its datatype and shape), so that a stage's bad answer is
blamed on that stage, not on the next stage's caller or on the pipeline's own decoding.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from protos import inference_pb2 as pb
from protos.topology.models import TensorSpec
from runtimes.dataplane import shape_matches
from runtimes.errors import InvalidInput, PredictError
from runtimes.grpc_codec import ContentsData
from runtimes.messages import SHARED_MEMORY_REGION, OutputTensor, RequestInput, shared_memory_refused
from runtimes.tensors import (
    CONTENTS_FIELD,
    DATATYPES,
    RawData,
    decode_raw,
    element_count,
    encode_raw,
    format_shape,
    numpy_dtype,
)

#: The 4-byte little-endian length before each element of a raw BYTES tensor.
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class WireTensor:
    """One tensor in its raw wire form."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes

    def array(self) -> np.ndarray:
        """The tensor decoded and shaped (for JSON answers and comparisons)."""
        return decode_raw(self.name, self.datatype, self.raw).reshape(self.shape)


def pipeline_inputs(inputs: Sequence[RequestInput], expected: Sequence[TensorSpec], app: str) -> list[WireTensor]:
    """The client's inputs checked against the pipeline's signature (first stage's inputs), as raw tensors."""
    specs = {s.name: s for s in expected}
    wanted = ", ".join(f"{s.name} ({s.datatype} {format_shape(s.shape)})" for s in expected)
    tensors: dict[str, WireTensor] = {}
    for tensor in inputs:
        spec = specs.get(tensor.name)
        if spec is None:
            raise InvalidInput(f"unknown input {tensor.name!r}; application {app!r} expects: {wanted}")
        if tensor.name in tensors:
            raise InvalidInput(f"input {tensor.name!r} is given more than once")
        if tensor.datatype != spec.datatype:
            raise InvalidInput(
                f"input {tensor.name!r} has datatype {tensor.datatype}, application {app!r} expects {spec.datatype}"
            )
        if any(d < 0 for d in tensor.shape) or not shape_matches(tensor.shape, spec.shape):
            raise InvalidInput(
                f"input {tensor.name!r} has shape {format_shape(tensor.shape)}, application {app!r} expects "
                f"{format_shape(spec.shape)} (-1 is any size)"
            )
        if tensor.parameters and SHARED_MEMORY_REGION in tensor.parameters:
            raise shared_memory_refused(f"input {tensor.name!r}")
        data = tensor.data
        # Raw bytes go on as they came; anything else is encoded once. The length of fixed-size raw data is checked
        # here, so that the client's mistake is not reported as stage 1's; raw BYTES are split by the first stage
        # only (a walk here would cost every BYTES request its length prefixes twice).
        if isinstance(data, RawData):
            raw = bytes(data.raw)
            if tensor.datatype != "BYTES":
                size = element_count(tensor.shape) * numpy_dtype(tensor.datatype).itemsize
                if len(raw) != size:
                    raise InvalidInput(
                        f"input {tensor.name!r} has {len(raw)} bytes of raw data, but {tensor.datatype} "
                        f"{format_shape(tensor.shape)} needs {size}"
                    )
        else:
            flat = data.decode(tensor.name, tensor.datatype)
            if flat.size != element_count(tensor.shape):
                raise InvalidInput(
                    f"input {tensor.name!r} has {flat.size} data elements, but shape {format_shape(tensor.shape)} "
                    f"needs {element_count(tensor.shape)}"
                )
            raw = encode_raw(flat, tensor.datatype)
        tensors[tensor.name] = WireTensor(tensor.name, tensor.datatype, tuple(tensor.shape), raw)
    missing = [s.name for s in expected if s.name not in tensors]
    if missing:
        raise InvalidInput(f"missing input {', '.join(map(repr, missing))}; application {app!r} expects: {wanted}")
    return list(tensors.values())


def _bytes_elements(name: str, raw: bytes, limit: int) -> int:
    # Walks the length prefixes without copying an element (the pipeline passes BYTES tensors on undecoded); the
    # loop is kept minimal because it runs on the event loop for every BYTES tensor of every stage. It stops past
    # ``limit``, as the runtimes' request decoding does (tensors.decode_raw's count): every 4 bytes can be one empty
    # element, and an answer declaring [1] may carry millions.
    unpack = _LENGTH.unpack_from
    count, offset, end = 0, 0, len(raw)
    while offset + 4 <= end:
        if count == limit:
            raise PredictError(
                f"output {name!r}: the raw BYTES data holds more than the {limit} elements its shape needs"
            )
        offset += 4 + unpack(raw, offset)[0]
        count += 1
    if offset < end:
        raise PredictError(f"output {name!r}: raw BYTES data is cut off in a length prefix")
    if offset > end:
        raise PredictError(f"output {name!r}: raw BYTES data is cut off in its last element")
    return count


def _check_declared(name: str, datatype: str, shape: Sequence[int]) -> int:
    """The element count of a stage output's shape; PredictError for a negative dimension or unknown datatype."""
    # The shape is formatted only for an error: this runs for every output of every stage call.
    if any(d < 0 for d in shape):
        raise PredictError(f"output {name!r} has shape {format_shape(shape)}, with a negative dimension")
    if datatype not in DATATYPES:
        raise PredictError(f"output {name!r} has unknown datatype {datatype!r}")
    return element_count(shape)


def check_size(tensor: WireTensor) -> None:
    """PredictError unless ``tensor``'s bytes are exactly what its datatype and shape need (one element per
    length-prefixed item for BYTES): a stage's answer checked where the stage can still be named."""
    count = _check_declared(tensor.name, tensor.datatype, tensor.shape)
    if tensor.datatype == "BYTES":
        elements = _bytes_elements(tensor.name, tensor.raw, count)
        if elements != count:
            raise PredictError(
                f"output {tensor.name!r} has {elements} BYTES elements, but shape {format_shape(tensor.shape)} "
                f"needs {count}"
            )
        return
    size = count * numpy_dtype(tensor.datatype).itemsize
    if len(tensor.raw) != size:
        raise PredictError(
            f"output {tensor.name!r} has {len(tensor.raw)} bytes of raw data, but {tensor.datatype} "
            f"{format_shape(tensor.shape)} "
            f"needs {size}"
        )


def _typed_raw(tensor: pb.ModelInferResponse.InferOutputTensor) -> bytes:
    # Typed contents are decoded and re-encoded as raw: more values than the shape needs are refused first, by the
    # field's length, rather than converted (element by element, for BYTES) only to be refused by check_size.
    count = _check_declared(tensor.name, tensor.datatype, tensor.shape)
    field = CONTENTS_FIELD.get(tensor.datatype)
    if field is not None:
        found = len(getattr(tensor.contents, field))
        if found > count:
            raise PredictError(
                f"output {tensor.name!r} has {found} values in contents.{field}, but shape "
                f"{format_shape(tensor.shape)} needs {count}"
            )
    return encode_raw(ContentsData(tensor.contents).decode(tensor.name, tensor.datatype), tensor.datatype)


def response_outputs(response: pb.ModelInferResponse) -> dict[str, WireTensor]:
    """A stage's outputs by name, raw whichever way the stage sent them; PredictError if any does not fit its
    datatype and shape."""
    raw = response.raw_output_contents
    if raw and len(raw) != len(response.outputs):
        raise PredictError(f"{len(raw)} raw_output_contents for {len(response.outputs)} outputs")
    outputs: dict[str, WireTensor] = {}
    for index, tensor in enumerate(response.outputs):
        data = bytes(raw[index]) if raw else _typed_raw(tensor)
        wire = WireTensor(tensor.name, tensor.datatype, tuple(tensor.shape), data)
        check_size(wire)
        outputs[tensor.name] = wire
    return outputs


def output_tensors(tensors: Sequence[WireTensor]) -> list[OutputTensor]:
    """Decoded outputs, for the runtimes' REST and typed gRPC encoders."""
    return [OutputTensor(t.name, t.datatype, t.array()) for t in tensors]


def agree(primary: WireTensor, other: WireTensor | None, rtol: float = 1e-5, atol: float = 1e-6) -> bool:
    """Whether a shadow's output matches the primary's: close for floating point, equal for everything else."""
    if other is None or other.datatype != primary.datatype or other.shape != primary.shape:
        return False
    if other.raw == primary.raw:
        return True
    if primary.datatype not in ("FP16", "FP32", "FP64"):
        return False
    return bool(np.allclose(primary.array(), other.array(), rtol=rtol, atol=atol, equal_nan=True))
