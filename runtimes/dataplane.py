"""The protocol-independent core of a runtime: which requests it answers, validation, prediction, outputs.

A runtime serves one model version. It answers requests naming that model, or naming anything the mesh resolved
to it: the ingress sets ``x-hydro-application`` to the application name it routed, and a request whose model name
equals that header is ours. Every answer names the real model and version, so clients see which variant served.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from protos.topology import Signature, TensorSpec
from runtimes.base import ModelRuntime
from runtimes.errors import (
    InferenceError,
    InvalidInput,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    PayloadTooLarge,
    PredictError,
)
from runtimes.messages import (
    ArrayData,
    InferRequest,
    InferResponse,
    ModelMetadata,
    OutputTensor,
    RequestInput,
    TensorMetadata,
)
from runtimes.tensors import cast, element_count, format_shape, zeros

__all__ = [
    "APPLICATION_HEADER",
    "DataPlane",
    "InferenceError",
    "InvalidInput",
    "ModelNotFound",
    "ModelNotReady",
    "PayloadTooLarge",
    "PredictError",
]

log = logging.getLogger(__name__)

#: Set by the ingress to the application name it resolved to this model version.
APPLICATION_HEADER = "x-hydro-application"

_T = TypeVar("_T")


def shape_matches(shape: Sequence[int], expected: Sequence[int]) -> bool:
    """Whether ``shape`` fits ``expected``, where -1 in ``expected`` accepts any size."""
    return len(shape) == len(expected) and all(e == -1 or e == d for d, e in zip(shape, expected, strict=True))


def default_predict_threads() -> int:
    """Worker threads for predict calls: enough to overlap numpy work that releases the GIL, no more."""
    return max(1, min(4, os.cpu_count() or 1))


class DataPlane:
    """Validates requests against the signature and runs the model off the event loop."""

    def __init__(
        self,
        runtime: ModelRuntime,
        *,
        name: str,
        version: int,
        executor: Executor | None = None,
    ) -> None:
        self.runtime = runtime
        self.name = name
        self.version = version
        self.signature: Signature = runtime.config.signature
        self.platform = runtime.kind
        self._executor = executor or ThreadPoolExecutor(default_predict_threads(), thread_name_prefix="predict")
        self._state = "loading"
        self._inputs = {spec.name: spec for spec in self.signature.inputs}
        self._outputs = {spec.name: spec for spec in self.signature.outputs}

    # -- state -------------------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Loaded, warmed up and not shutting down."""
        return self._state == "ready"

    @property
    def state(self) -> str:
        """One of loading, ready, failed, stopping."""
        return self._state

    @property
    def version_string(self) -> str:
        """The served version as it appears on the wire."""
        return str(self.version)

    async def load(self) -> None:
        """Load the model, then run one prediction on zeros; ready only if both pass (else ModelLoadError)."""
        self._state = "loading"
        try:
            await self._run(self.runtime.load)
            await self._run(self._warm_up)
        except BaseException:
            self._state = "failed"
            raise
        self._state = "ready"

    def stop(self) -> None:
        """Report not ready from now on (shutdown has begun); requests already running finish."""
        self._state = "stopping"

    def shutdown_executor(self) -> None:
        """Let go of the worker threads without waiting for a prediction that is still running."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _warm_up(self) -> None:
        # Wildcard dimensions become 1: the smallest input every model must accept.
        arrays = {s.name: zeros(s.datatype, [1 if d == -1 else d for d in s.shape]) for s in self._inputs.values()}
        try:
            self._predict(arrays, list(self._outputs.values()))
        except PredictError as exc:
            raise ModelLoadError(f"warm-up prediction on zeros failed: {exc}") from exc

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    # -- addressing --------------------------------------------------------------------------------------------

    def resolve(self, name: str, version: str = "", application: str | None = None) -> None:
        """Raise ModelNotFound unless ``name``/``version`` address this runtime's model version."""
        if name != self.name and not (application and application == name):
            raise ModelNotFound(f"model {name!r} is not served here (this runtime serves {self.name!r})")
        if version and version != self.version_string:
            raise ModelNotFound(
                f"model {name!r} has no version {version!r} here (this runtime serves version {self.version})"
            )

    def model_ready(self, name: str, version: str = "", application: str | None = None) -> bool:
        """Whether the addressed model is ready (ModelNotFound if it is not ours)."""
        self.resolve(name, version, application)
        return self.ready

    def model_metadata(self, name: str, version: str = "", application: str | None = None) -> ModelMetadata:
        """The served model's name, version, platform and signature."""
        self.resolve(name, version, application)

        def describe(specs: Sequence[TensorSpec]) -> list[TensorMetadata]:
            return [TensorMetadata(spec.name, spec.datatype, list(spec.shape)) for spec in specs]

        return ModelMetadata(
            name=self.name,
            versions=[self.version_string],
            platform=self.platform,
            inputs=describe(self.signature.inputs),
            outputs=describe(self.signature.outputs),
        )

    # -- inference ---------------------------------------------------------------------------------------------

    async def infer(self, request: InferRequest, application: str | None = None) -> InferResponse:
        """Answer one request: address check, readiness, validation and prediction (the last two off the loop)."""
        self.resolve(request.model_name, request.model_version, application)
        if not self.ready:
            raise ModelNotReady(f"model {self.name!r} version {self.version} is not ready ({self._state})")
        wanted = self._requested_outputs(request)
        outputs = await self._run(self._validate_and_predict, request.inputs, wanted)
        return InferResponse(self.name, self.version_string, outputs, request.id)

    def _requested_outputs(self, request: InferRequest) -> list[TensorSpec]:
        if not request.outputs:
            return list(self._outputs.values())
        wanted: dict[str, TensorSpec] = {}
        for requested in request.outputs:
            spec = self._outputs.get(requested.name)
            if spec is None:
                raise InvalidInput(
                    f"unknown output {requested.name!r} requested; model {self.name!r} has outputs: "
                    f"{', '.join(self._outputs)}"
                )
            wanted[spec.name] = spec
        return list(wanted.values())

    def validate(self, inputs: Sequence[RequestInput]) -> dict[str, np.ndarray]:
        """Check the inputs against the signature and decode them; InvalidInput names the offending tensor."""
        expected = ", ".join(f"{s.name} ({s.datatype} {format_shape(s.shape)})" for s in self._inputs.values())
        arrays: dict[str, np.ndarray] = {}
        for tensor in inputs:
            spec = self._inputs.get(tensor.name)
            if spec is None:
                raise InvalidInput(f"unknown input {tensor.name!r}; model {self.name!r} expects: {expected}")
            if tensor.name in arrays:
                raise InvalidInput(f"input {tensor.name!r} is given more than once")
            if tensor.datatype != spec.datatype:
                raise InvalidInput(
                    f"input {tensor.name!r} has datatype {tensor.datatype}, model {self.name!r} expects {spec.datatype}"
                )
            if any(d < 0 for d in tensor.shape):
                raise InvalidInput(f"input {tensor.name!r} has shape {format_shape(tensor.shape)}: sizes must be >= 0")
            if not shape_matches(tensor.shape, spec.shape):
                raise InvalidInput(
                    f"input {tensor.name!r} has shape {format_shape(tensor.shape)}, model {self.name!r} expects "
                    f"{format_shape(spec.shape)} (-1 is any size)"
                )
            flat = tensor.data.decode(tensor.name, tensor.datatype)
            count = element_count(tensor.shape)
            if flat.size != count:
                raise InvalidInput(
                    f"input {tensor.name!r} has {flat.size} data elements, but shape {format_shape(tensor.shape)} "
                    f"needs {count}"
                )
            arrays[tensor.name] = flat.reshape(tensor.shape)
        missing = [name for name in self._inputs if name not in arrays]
        if missing:
            raise InvalidInput(
                f"missing input {', '.join(repr(n) for n in missing)}; model {self.name!r} expects: {expected}"
            )
        return arrays

    def _validate_and_predict(self, inputs: Sequence[RequestInput], wanted: list[TensorSpec]) -> list[OutputTensor]:
        return self._predict(self.validate(inputs), wanted)

    def _predict(self, arrays: dict[str, np.ndarray], wanted: list[TensorSpec]) -> list[OutputTensor]:
        try:
            result = self.runtime.predict(arrays)
        except (Exception, SystemExit) as exc:
            # The model's own bug: the client gets the message, the log gets the traceback, the process lives on.
            log.exception("predict failed for model %s version %s", self.name, self.version)
            raise PredictError(f"model {self.name!r} failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(result, Mapping):
            raise PredictError(
                f"model {self.name!r} returned {type(result).__name__}; predict must return a dict of output arrays"
            )
        return [self._output(result, spec) for spec in wanted]

    def _output(self, result: Mapping[str, Any], spec: TensorSpec) -> OutputTensor:
        if spec.name not in result:
            returned = ", ".join(map(str, result)) or "nothing"
            raise PredictError(f"model {self.name!r} returned no output {spec.name!r} (it returned: {returned})")
        try:
            data = cast(result[spec.name], spec.datatype)
        except (ValueError, TypeError, InferenceError) as exc:
            raise PredictError(f"model {self.name!r}: output {spec.name!r} is not {spec.datatype}: {exc}") from exc
        if not shape_matches(data.shape, spec.shape):
            raise PredictError(
                f"model {self.name!r}: output {spec.name!r} has shape {format_shape(data.shape)}, the signature "
                f"says {format_shape(spec.shape)}"
            )
        return OutputTensor(spec.name, spec.datatype, data)


def array_inputs(arrays: Mapping[str, np.ndarray], signature: Signature) -> list[RequestInput]:
    """Request inputs from numpy arrays, with the signature's datatypes (for in-process callers and tests)."""
    specs = {spec.name: spec for spec in signature.inputs}
    return [
        RequestInput(name, specs[name].datatype if name in specs else "FP32", tuple(a.shape), ArrayData(a))
        for name, a in arrays.items()
    ]
