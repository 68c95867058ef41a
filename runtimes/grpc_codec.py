"""gRPC ModelInferRequest / ModelInferResponse messages to and from the data plane's types.

Input data comes either in each tensor's typed ``contents`` or, for all inputs at once, in ``raw_input_contents``
(what tritonclient sends). Outputs go in ``raw_output_contents`` when the request used raw inputs (or when an
output is FP16, which has no typed field), else in typed ``contents``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from protos import inference_pb2 as pb
from runtimes.errors import InvalidInput
from runtimes.messages import (
    InferRequest,
    InferResponse,
    ModelMetadata,
    Parameters,
    RequestedOutput,
    RequestInput,
    TensorData,
)
from runtimes.tensors import CONTENTS_FIELD, RawData, as_bytes_array, encode_raw, fit_integers, numpy_dtype

#: Datatypes carried in a 32-bit typed field although narrower: a value there may not fit them.
_NARROW_INTEGERS = frozenset({"INT8", "INT16", "UINT8", "UINT16"})


class ContentsData:
    """An input's typed ``contents``; which field holds the data depends on the datatype."""

    __slots__ = ("contents",)

    def __init__(self, contents: pb.InferTensorContents) -> None:
        self.contents = contents

    def decode(self, name: str, datatype: str, count: int | None = None) -> np.ndarray:
        """The values of the field that belongs to ``datatype``, as a flat array (already parsed by protobuf)."""
        field = CONTENTS_FIELD.get(datatype)
        if field is None:
            numpy_dtype(datatype)  # an unknown datatype gets its own message
            raise InvalidInput(f"input {name!r}: {datatype} data must be sent in raw_input_contents")
        values = getattr(self.contents, field)
        if not len(values):
            others = [f.name for f, _ in self.contents.ListFields()]
            if others:
                raise InvalidInput(f"input {name!r}: {datatype} data belongs in contents.{field}, not {others[0]}")
        if datatype == "BYTES":
            return as_bytes_array(values)
        if datatype in _NARROW_INTEGERS:
            # numpy would wrap a 32-bit field's 300 to INT8 44: read them wide, then check they fit.
            return fit_integers(name, datatype, np.asarray(values, dtype=np.int64))
        try:
            return np.asarray(values, dtype=numpy_dtype(datatype))
        except OverflowError as exc:
            raise InvalidInput(f"input {name!r}: a value does not fit {datatype}: {exc}") from None


def _parameters(parameters: Mapping[str, pb.InferParameter]) -> Parameters:
    if not parameters:
        # The common case; iterating an empty protobuf map still costs a few microseconds per tensor.
        return {}
    decoded: Parameters = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is not None:
            decoded[key] = getattr(parameter, choice)
    return decoded


def parse_model_infer_request(message: pb.ModelInferRequest) -> InferRequest:
    """The data plane's request for a gRPC ModelInferRequest."""
    # Repeated fields are sliced into lists first: upb builds a slice several times faster than it iterates.
    raw = message.raw_input_contents[:]
    tensors = message.inputs[:]
    if raw and len(raw) != len(tensors):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(tensors)} inputs; send one entry per input"
        )
    inputs: list[RequestInput] = []
    for index, tensor in enumerate(tensors):
        data: TensorData
        if raw:
            if tensor.HasField("contents") and tensor.contents.ListFields():
                raise InvalidInput(f"input {tensor.name!r} has both contents and raw_input_contents; use one")
            data = RawData(raw[index])
        else:
            data = ContentsData(tensor.contents)
        shape = tuple(tensor.shape[:])
        inputs.append(RequestInput(tensor.name, tensor.datatype, shape, data, _parameters(tensor.parameters)))
    outputs = [RequestedOutput(o.name, _parameters(o.parameters)) for o in message.outputs[:]]
    return InferRequest(
        model_name=message.model_name,
        model_version=message.model_version,
        inputs=inputs,
        outputs=outputs,
        id=message.id,
        parameters=_parameters(message.parameters),
    )


def uses_raw_inputs(message: pb.ModelInferRequest) -> bool:
    """Whether the request sent its data in raw_input_contents (the response then does the same)."""
    return len(message.raw_input_contents) > 0


def build_model_metadata_response(meta: ModelMetadata) -> pb.ModelMetadataResponse:
    """The gRPC ModelMetadataResponse of a model's (or a pipeline's) metadata."""
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=meta.name,
        versions=meta.versions,
        platform=meta.platform,
        inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs],
        outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs],
    )


def build_model_infer_response(response: InferResponse, raw: bool) -> pb.ModelInferResponse:
    """The gRPC ModelInferResponse for a data-plane response; ``raw`` puts outputs in raw_output_contents."""
    outputs = response.outputs
    # The spec forbids mixing: if one output must be raw (FP16), all are.
    use_raw = raw or any(t.datatype not in CONTENTS_FIELD for t in outputs)
    message = pb.ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version,
        id=response.id,
        raw_output_contents=[encode_raw(t.data, t.datatype) for t in outputs] if use_raw else (),
    )
    add = message.outputs.add
    for tensor in outputs:
        # The shape as numpy's tuple: upb takes a tuple several times faster than a list.
        output = add(name=tensor.name, datatype=tensor.datatype, shape=tensor.data.shape)
        if not use_raw:
            flat = tensor.data.reshape(-1)
            values = list(flat) if tensor.datatype == "BYTES" else flat.tolist()
            getattr(output.contents, CONTENTS_FIELD[tensor.datatype]).extend(values)
    return message
