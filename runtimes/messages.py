"""Protocol-neutral inference requests and responses, as the data plane sees them.

The REST and gRPC codecs translate their wire formats to and from these, so validation and prediction are written
once for both protocols.

The types made for every request (inputs, outputs, request, response) are treated as immutable but not frozen: a
frozen dataclass sets each field through object.__setattr__, which cost ~6 us of every gRPC request (of ~160 us
in-process for a one-row sklearn model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from runtimes.errors import InvalidInput

#: Request, tensor and response parameters: the scalar types both JSON and gRPC InferParameter can carry.
Parameters = dict[str, bool | int | float | str]


class TensorData(Protocol):
    """An input's data as it came off the wire, decoded only once the data plane has checked name, datatype and
    shape against the signature (so a mismatch is reported as such, not as undecodable data)."""

    def decode(self, name: str, datatype: str, count: int | None = None) -> np.ndarray:
        """The data as a flat numpy array of ``datatype``; InvalidInput naming ``name`` if it cannot be.

        ``count`` is the number of elements the declared shape needs: a decoder whose work is not bounded by the
        size of what was already parsed (raw BYTES: 4 bytes can be one element) stops as soon as it sees more.
        """
        ...


@dataclass(frozen=True)
class ArrayData:
    """Data that is already a numpy array (the warm-up call, in-process callers)."""

    array: np.ndarray

    def decode(self, name: str, datatype: str, count: int | None = None) -> np.ndarray:
        """The array, flattened."""
        return self.array.reshape(-1)


@dataclass
class RequestInput:
    """One input tensor as the client declared it."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: TensorData
    parameters: Parameters = field(default_factory=dict)


@dataclass
class RequestedOutput:
    """An output the client asked for, with its per-output parameters (e.g. ``binary_data``)."""

    name: str
    parameters: Parameters = field(default_factory=dict)


@dataclass
class InferRequest:
    """An inference request addressed to ``model_name`` (and ``model_version``, empty for any)."""

    model_name: str
    model_version: str
    inputs: list[RequestInput]
    outputs: list[RequestedOutput] = field(default_factory=list)
    id: str = ""
    parameters: Parameters = field(default_factory=dict)


@dataclass
class OutputTensor:
    """One output tensor, already cast to its signature datatype and shaped."""

    name: str
    datatype: str
    data: np.ndarray

    @property
    def shape(self) -> list[int]:
        """The tensor's shape as a list of ints (for the wire formats)."""
        return [int(d) for d in self.data.shape]


@dataclass
class InferResponse:
    """The answer: always names the model and version that really served the request."""

    model_name: str
    model_version: str
    outputs: list[OutputTensor]
    id: str = ""


@dataclass(frozen=True)
class TensorMetadata:
    """One entry of a model's signature, as reported by model metadata."""

    name: str
    datatype: str
    shape: list[int]


@dataclass(frozen=True)
class ModelMetadata:
    """Name, versions, platform and signature of the served model."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


#: Triton's shared-memory extension names a region in a tensor's parameters instead of carrying its data.
SHARED_MEMORY_REGION = "shared_memory_region"


def shared_memory_refused(where: str) -> InvalidInput:
    """The error for a tensor in a shared-memory region. The extension is not offered (server metadata does not
    list it, and there is no region to register): a region's input would be read as empty data, and an output asked
    for in a region would be answered inline, never written where the client reads it."""
    return InvalidInput(f"{where}: the shared-memory extension is not supported: send the data in the request")


def check_requested_output(output: RequestedOutput) -> None:
    """InvalidInput if ``output`` asks for an extension this server does not offer (shared memory, Triton's
    classification): ignoring it would hand back a tensor where the client expects a region written or class
    labels. Model runtimes and pipelines alike."""
    if SHARED_MEMORY_REGION in output.parameters:
        raise shared_memory_refused(f"output {output.name!r}")
    if output.parameters.get("classification"):
        # tritonclient's class_count; server metadata does not list the extension.
        raise InvalidInput(f"output {output.name!r}: the classification extension is not supported")
