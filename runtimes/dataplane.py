"""The protocol-independent core of a runtime: which requests it answers, validation, prediction, outputs.

A runtime serves one model version. It answers requests naming that model, or naming anything the mesh resolved
to it: the ingress sets ``x-hydro-application`` to the application name it routed, and a request whose model name
equals that header is ours. Every answer names the real model and version, so clients see which variant served.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from prometheus_client import CollectorRegistry

from protos.topology.models import Signature, TensorSpec
from runtimes.base import ModelRuntime
from runtimes.batching import Batcher, BatchingOptions, request_rows, unbatchable_reason
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
    SHARED_MEMORY_REGION,
    ArrayData,
    InferRequest,
    InferResponse,
    ModelMetadata,
    OutputTensor,
    RequestInput,
    TensorMetadata,
    check_requested_output,
    shared_memory_refused,
)
from runtimes.statistics import Snapshot, Statistics
from runtimes.tensors import JsonData, cast, element_count, format_shape, zeros

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

#: A predict whose thread CPU time (EWMA) stays below this runs on the event loop for small requests: the hop to
#: a worker thread and back (and the GIL hand-over it causes) costs more than the prediction itself.
INLINE_BUDGET_SECONDS = 0.0005
#: How often the predict cost that decides inline execution is measured (one call in this many).
COST_SAMPLE_EVERY = 8


def shape_matches(shape: Sequence[int], expected: Sequence[int]) -> bool:
    """Whether ``shape`` fits ``expected``, where -1 in ``expected`` accepts any size."""
    if len(shape) != len(expected):
        return False
    # A plain loop: called for every input and output of every request, where a generator costs twice as much.
    for size, wanted in zip(shape, expected, strict=True):
        if wanted != -1 and wanted != size:
            return False
    return True


def default_predict_threads() -> int:
    """Worker threads for predict calls: enough to overlap numpy work that releases the GIL, no more."""
    return max(1, min(4, os.cpu_count() or 1))


@dataclass(slots=True)
class _Timing:
    """perf_counter_ns() marks of one request's stages, for the statistics (0 = not reached)."""

    submitted: int = 0
    started: int = 0
    validated: int = 0
    predicted: int = 0
    finished: int = 0
    #: Nanoseconds spent waiting for a batch (between validated and predicted): queue time, not compute time.
    batch_wait: int = 0
    #: Inferences the request counts for: with batching on, its batch size (Triton's inference_count), else 1.
    inferences: int = 1


def fewest_rows(inputs: Sequence[RequestInput]) -> int:
    """The fewest rows (first dimension) among the inputs; 0 for none or a scalar."""
    # A plain loop: min() over a generator cost ~1 us of every request.
    rows = -1
    for tensor in inputs:
        count = tensor.shape[0] if tensor.shape else 0
        if rows < 0 or count < rows:
            rows = count
    return max(rows, 0)


class DataPlane:
    """Validates requests against the signature and runs the model off the event loop."""

    def __init__(
        self,
        runtime: ModelRuntime,
        *,
        name: str,
        version: int,
        executor: Executor | None = None,
        batching: BatchingOptions | None = None,
    ) -> None:
        self.runtime = runtime
        self.name = name
        self.version = version
        self._version_string = str(version)
        self.signature: Signature = runtime.config.signature
        self.platform = runtime.kind
        self._executor = executor or ThreadPoolExecutor(default_predict_threads(), thread_name_prefix="predict")
        self._state = "loading"
        self._inputs = {spec.name: spec for spec in self.signature.inputs}
        self._outputs = {spec.name: spec for spec in self.signature.outputs}
        #: The signature's inputs as error messages list them.
        self._expected = ", ".join(f"{s.name} ({s.datatype} {format_shape(s.shape)})" for s in self._inputs.values())
        self.statistics = Statistics()
        self._inline_rows = runtime.inline_rows
        # Unknown until the warm-up call has been measured: until then nothing runs inline.
        self._predict_cost = math.inf
        #: Predict calls so far; every COST_SAMPLE_EVERY-th one is timed.
        self._predict_calls = 0
        #: Prometheus metrics of this data plane (served at /metrics by the REST app).
        self.metrics = CollectorRegistry()
        self.batcher: Batcher | None = None
        if batching is not None:
            reason = unbatchable_reason(self.signature)
            if reason is None:
                labels = {"model": name, "version": str(version)}
                self.batcher = Batcher(batching, self._predict_rows, self.metrics, labels)
            else:
                log.warning("batching is off for model %s version %s: %s", name, version, reason)

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
        return self._version_string

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
        example = self.runtime.config.warmup
        if example is None:
            # Wildcard dimensions become 1: the smallest input every model must accept.
            arrays = {s.name: zeros(s.datatype, [1 if d == -1 else d for d in s.shape]) for s in self._inputs.values()}
            what = "on zeros (serving.yaml's `warmup:` can give an example request instead)"
        else:
            # Checked as a request is: a shape or value that does not fit the signature is named.
            inputs = [
                RequestInput(name, self._inputs[name].datatype, tuple(tensor.shape), JsonData(tensor.data))
                for name, tensor in example.items()
            ]
            try:
                arrays = self.validate(inputs)
            except InvalidInput as exc:
                raise ModelLoadError(f"serving.yaml warmup: {exc}") from exc
            what = "on serving.yaml's warmup request"
        try:
            self._predict(arrays, list(self._outputs.values()))
        except InvalidInput as exc:
            # The runtime judged the data itself (NaN where the model takes none): the example is what is wrong.
            where = "serving.yaml warmup" if example is not None else f"warm-up prediction {what}"
            raise ModelLoadError(f"{where}: {exc}") from exc
        except PredictError as exc:
            raise ModelLoadError(f"warm-up prediction {what} failed: {exc}") from exc

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    # -- addressing --------------------------------------------------------------------------------------------

    def resolve(self, name: str, version: str = "", application: str | None = None) -> None:
        """Raise ModelNotFound unless ``name``/``version`` address this runtime's model version."""
        by_application = name != self.name
        if by_application and not (application and application == name):
            raise ModelNotFound(f"model {name!r} is not served here (this runtime serves {self.name!r})")
        if by_application and version:
            # The ingress picked this variant by the application's weights; its version is not the caller's to ask.
            raise ModelNotFound(
                f"application {name!r} has no versions (asked for version {version!r}): address it without one, or "
                "a model version by its model's name"
            )
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

    def model_statistics(self, name: str, version: str = "", application: str | None = None) -> Snapshot:
        """Cumulative statistics of the served model; an empty ``name`` means every model (this one)."""
        if name:
            self.resolve(name, version, application)
        elif version:
            raise InvalidInput("a model version was given without a model name")
        return self.statistics.snapshot()

    # -- inference ---------------------------------------------------------------------------------------------

    async def infer(self, request: InferRequest, application: str | None = None) -> InferResponse:
        """Answer one request: address check, readiness, validation and prediction (the last two on a worker
        thread, unless measured cheap enough for the event loop, or through the batcher when batching is on)."""
        self.resolve(request.model_name, request.model_version, application)
        timing = _Timing(time.perf_counter_ns())
        try:
            if self._state != "ready":
                raise ModelNotReady(f"model {self.name!r} version {self.version} is not ready ({self._state})")
            wanted = self._requested_outputs(request)
            inputs = request.inputs
            if self.batcher is not None:
                outputs = await self._batched(inputs, wanted, timing)
            elif self._cheap(fewest_rows(inputs)):
                outputs = self._validate_and_predict(inputs, wanted, timing)
            else:
                outputs = await self._run(self._validate_and_predict, inputs, wanted, timing)
        except Exception:
            self.statistics.record_failure(time.perf_counter_ns() - timing.submitted)
            raise
        # Unbatched, a request is one execution of batch size 1 in Triton's terms (max_batch_size is 0); batched
        # executions are counted by _predict_rows.
        durations = (
            time.perf_counter_ns() - timing.submitted,
            timing.started - timing.submitted + timing.batch_wait,
            timing.validated - timing.started,
            timing.predicted - timing.validated - timing.batch_wait,
            timing.finished - timing.predicted,
        )
        if self.batcher is not None:
            self.statistics.record_success(*durations, inferences=timing.inferences)
        else:
            self.statistics.record_request(*durations)
        return InferResponse(self.name, self.version_string, outputs, request.id)

    def _cheap(self, rows: int) -> bool:
        """Whether a predict of ``rows`` rows may run on the event loop (measured cheap for this model)."""
        return 0 < rows <= self._inline_rows and self._predict_cost < INLINE_BUDGET_SECONDS

    async def _batched(
        self, inputs: Sequence[RequestInput], wanted: list[TensorSpec], timing: _Timing
    ) -> list[OutputTensor]:
        """Validate (inline when cheap, else on a worker thread), then predict through the batcher."""
        assert self.batcher is not None
        timing.started = time.perf_counter_ns()
        if self._cheap(fewest_rows(inputs)):
            arrays = self.validate(inputs)
        else:
            arrays = await self._run(self.validate, inputs)
        timing.validated = time.perf_counter_ns()
        count = request_rows(arrays)
        timing.inferences = 1 if count is None else count
        if count is None:
            # Inputs of different lengths cannot be concatenated with anyone else's: this request runs alone.
            everything = await self._run(self._predict, arrays, list(self._outputs.values()))
        else:
            everything, waited = await self.batcher.submit(arrays, count)
            timing.batch_wait = int(waited * 1e9)
        timing.predicted = timing.finished = time.perf_counter_ns()
        by_name = {tensor.name: tensor for tensor in everything}
        return [by_name[spec.name] for spec in wanted]

    async def _predict_rows(self, arrays: dict[str, np.ndarray], rows: int) -> list[OutputTensor]:
        """Every output for a batch of ``rows`` rows (the batcher's predict call)."""
        started = time.perf_counter_ns()
        outputs = list(self._outputs.values())
        if self._cheap(rows):
            result = self._predict(arrays, outputs)
        else:
            result = await self._run(self._predict, arrays, outputs)
        self.statistics.record_execution(rows, 0, time.perf_counter_ns() - started, 0)
        return result

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
            check_requested_output(requested)
            wanted[spec.name] = spec
        return list(wanted.values())

    def validate(self, inputs: Sequence[RequestInput]) -> dict[str, np.ndarray]:
        """Check the inputs against the signature and decode them; InvalidInput names the offending tensor."""
        expected = self._expected
        arrays: dict[str, np.ndarray] = {}
        for tensor in inputs:
            spec = self._inputs.get(tensor.name)
            if spec is None:
                raise InvalidInput(f"unknown input {tensor.name!r}; model {self.name!r} expects: {expected}")
            if tensor.parameters and SHARED_MEMORY_REGION in tensor.parameters:
                raise shared_memory_refused(f"input {tensor.name!r}")
            if tensor.name in arrays:
                raise InvalidInput(f"input {tensor.name!r} is given more than once")
            if tensor.datatype != spec.datatype:
                raise InvalidInput(
                    f"input {tensor.name!r} has datatype {tensor.datatype}, model {self.name!r} expects {spec.datatype}"
                )
            if min(tensor.shape, default=0) < 0:
                raise InvalidInput(f"input {tensor.name!r} has shape {format_shape(tensor.shape)}: sizes must be >= 0")
            if not shape_matches(tensor.shape, spec.shape):
                raise InvalidInput(
                    f"input {tensor.name!r} has shape {format_shape(tensor.shape)}, model {self.name!r} expects "
                    f"{format_shape(spec.shape)} (-1 is any size)"
                )
            count = element_count(tensor.shape)
            flat = tensor.data.decode(tensor.name, tensor.datatype, count)
            if flat.size != count:
                raise InvalidInput(
                    f"input {tensor.name!r} has {flat.size} data elements, but shape {format_shape(tensor.shape)} "
                    f"needs {count}"
                )
            try:
                arrays[tensor.name] = flat.reshape(tensor.shape)
            except ValueError as exc:
                # Only an empty tensor gets here with absurd sizes (e.g. [0, 2**64]): numpy cannot index them.
                raise InvalidInput(f"input {tensor.name!r} has shape {format_shape(tensor.shape)}: {exc}") from None
        # Every name in arrays is a known input, once: as many arrays as inputs means none is missing.
        missing = [] if len(arrays) == len(self._inputs) else [name for name in self._inputs if name not in arrays]
        if missing:
            raise InvalidInput(
                f"missing input {', '.join(repr(n) for n in missing)}; model {self.name!r} expects: {expected}"
            )
        return arrays

    def _validate_and_predict(
        self, inputs: Sequence[RequestInput], wanted: list[TensorSpec], timing: _Timing | None = None
    ) -> list[OutputTensor]:
        if timing is None:
            return self._predict(self.validate(inputs), wanted)
        timing.started = time.perf_counter_ns()
        arrays = self.validate(inputs)
        timing.validated = time.perf_counter_ns()
        return self._predict(arrays, wanted, timing)

    def _predict(
        self, arrays: dict[str, np.ndarray], wanted: list[TensorSpec], timing: _Timing | None = None
    ) -> list[OutputTensor]:
        self._predict_calls += 1
        # Thread CPU time is a system call: timing one call in 8 keeps the estimate and saves ~7 % of the event
        # loop's time on a 1-row sklearn model (py-spy, gRPC at c=16).
        timed = self._inline_rows > 0 and (
            self._predict_calls % COST_SAMPLE_EVERY == 1 or math.isinf(self._predict_cost)
        )
        cpu = time.thread_time() if timed else 0.0
        try:
            result = self.runtime.predict(arrays)
        except InvalidInput:
            # The runtime judged the data itself (e.g. NaN where the model takes none): the client's mistake.
            raise
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            # The model's own bug: the client gets the message, the log gets the traceback, the process lives on
            # (the two BaseExceptions too: out of a worker thread they would stop the event loop).
            log.exception("predict failed for model %s version %s", self.name, self.version)
            raise PredictError(f"model {self.name!r} failed: {type(exc).__name__}: {exc}") from exc
        if timed:
            self._observe_cost(time.thread_time() - cpu, arrays)
        if timing is not None:
            timing.predicted = time.perf_counter_ns()
        # type() first: the Mapping ABC check costs more than the rest of this function for the usual dict.
        if type(result) is not dict and not isinstance(result, Mapping):
            raise PredictError(
                f"model {self.name!r} returned {type(result).__name__}; predict must return a dict of output arrays"
            )
        outputs = [self._output(result, spec) for spec in wanted]
        if timing is not None:
            timing.finished = time.perf_counter_ns()
        return outputs

    def _observe_cost(self, seconds: float, arrays: Mapping[str, np.ndarray]) -> None:
        # Thread CPU time, not wall time: waiting for the GIL under load must not make a cheap model look costly.
        # Only calls small enough to run inline say anything about whether inline calls are cheap.
        rows = min((a.shape[0] if a.ndim else 0 for a in arrays.values()), default=0)
        if rows > self._inline_rows:
            return
        if math.isinf(self._predict_cost):
            self._predict_cost = seconds
        else:
            self._predict_cost = 0.8 * self._predict_cost + 0.2 * seconds

    def _output(self, result: Mapping[str, Any], spec: TensorSpec) -> OutputTensor:
        if spec.name not in result:
            returned = ", ".join(map(str, result)) or "nothing"
            raise PredictError(f"model {self.name!r} returned no output {spec.name!r} (it returned: {returned})")
        value = result[spec.name]
        try:
            data = cast(value, spec.datatype)
        except (ValueError, TypeError, OverflowError, InferenceError) as exc:
            # OverflowError: a Python int past INT64 in a list the model returned.
            raise PredictError(f"model {self.name!r}: output {spec.name!r} is not {spec.datatype}: {exc}") from exc
        # numpy's cast truncates 1.7 to 1 and wraps 300 to 44 (UINT8) without a word: a 200 with wrong numbers. Only
        # integer and BOOL targets can lose values so; an output that already has the datatype is not converted.
        if data is not value and data.dtype.kind in "iub":
            lost = lost_value(value, data)
            if lost is not None:
                raise PredictError(
                    f"model {self.name!r}: output {spec.name!r} is not {spec.datatype}: the model returned {lost}, "
                    f"which {spec.datatype} cannot hold (declare the datatype the model returns)"
                )
        if not shape_matches(data.shape, spec.shape):
            raise PredictError(
                f"model {self.name!r}: output {spec.name!r} has shape {format_shape(data.shape)}, the signature "
                f"says {format_shape(spec.shape)}"
            )
        return OutputTensor(spec.name, spec.datatype, data)


def lost_value(value: Any, converted: np.ndarray) -> str | None:
    """The first number of ``value`` that ``converted`` (its integer or BOOL cast) does not hold, or None."""
    source = value if isinstance(value, np.ndarray) else np.asarray(value)
    # Only numbers can be compared; text parsed by the cast ("3") and booleans (0/1) lose nothing checkable here.
    if source.dtype.kind not in "iuf" or source.shape != converted.shape:
        return None
    # NaN differs from everything, so it is reported too (numpy casts it to an arbitrary integer).
    differs = converted != source
    if not differs.any():
        return None
    return repr(source.reshape(-1)[int(np.flatnonzero(differs.reshape(-1))[0])].item())


def array_inputs(arrays: Mapping[str, np.ndarray], signature: Signature) -> list[RequestInput]:
    """Request inputs from numpy arrays, with the signature's datatypes (for in-process callers and tests)."""
    specs = {spec.name: spec for spec in signature.inputs}
    return [
        RequestInput(name, specs[name].datatype if name in specs else "FP32", tuple(a.shape), ArrayData(a))
        for name, a in arrays.items()
    ]
