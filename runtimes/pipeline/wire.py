"""Tensors as they travel between stages: name, datatype, shape and raw little-endian bytes.

A stage's raw outputs become the next stage's raw inputs unchanged, so the pipeline never decodes what it only
passes along; only the client's inputs and the final outputs are converted, by the runtimes' own codecs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from protos import inference_pb2 as pb
from protos.topology import TensorSpec
from runtimes.dataplane import shape_matches
from runtimes.errors import InvalidInput, PredictError
from runtimes.grpc_codec import ContentsData
from runtimes.messages import OutputTensor, RequestInput
from runtimes.tensors import RawData, decode_raw, element_count, encode_raw, format_shape


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
        data = tensor.data
        # Raw bytes go on as they came (the first stage checks their length); anything else is encoded once.
        if isinstance(data, RawData):
            raw = bytes(data.raw)
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


def response_outputs(response: pb.ModelInferResponse) -> dict[str, WireTensor]:
    """A stage's outputs by name, raw whichever way the stage sent them."""
    raw = response.raw_output_contents
    if raw and len(raw) != len(response.outputs):
        raise PredictError(f"{len(raw)} raw_output_contents for {len(response.outputs)} outputs")
    outputs: dict[str, WireTensor] = {}
    for index, tensor in enumerate(response.outputs):
        if raw:
            data = bytes(raw[index])
        else:
            data = encode_raw(ContentsData(tensor.contents).decode(tensor.name, tensor.datatype), tensor.datatype)
        outputs[tensor.name] = WireTensor(tensor.name, tensor.datatype, tuple(tensor.shape), data)
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
