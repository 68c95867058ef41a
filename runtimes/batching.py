"""Adaptive batching: concurrent requests to one model become one predict call.

A request waits in a queue until ``max_batch_size`` rows are queued or the oldest queued request has waited
``max_delay_ms``; then the inputs of every queued request are concatenated along the first dimension, the model
predicts once, and each caller gets its own rows of every output back. Under light load a request waits at most
``max_delay_ms``; under heavy load batches fill up at once and per-call costs (framework overhead, Python
dispatch, the hop to a worker thread) are paid once per batch instead of once per request.

Requests were validated against the signature before they are queued, so a malformed request never joins a
batch. If the batched predict fails (the model raised on someone's data), every request of the batch is predicted
on its own, so only the request that makes the model fail gets the error.

Only signatures whose inputs and outputs all have a wildcard first dimension and fixed other dimensions are
batchable: then any two requests concatenate, and the outputs split back by row counts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from protos.topology.models import Signature
from runtimes.errors import PredictError
from runtimes.messages import OutputTensor

log = logging.getLogger(__name__)

#: Predicts a batch: input arrays (all with the same number of rows) and that row count -> every output.
BatchPredict = Callable[[dict[str, np.ndarray], int], Awaitable[list[OutputTensor]]]

_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_QUEUE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass(frozen=True)
class BatchingOptions:
    """How large a batch may grow and how long a request may wait for others to join it."""

    max_batch_size: int
    max_delay_ms: float

    def __post_init__(self) -> None:
        if self.max_batch_size < 2:
            raise ValueError(f"max_batch_size must be at least 2 (got {self.max_batch_size})")
        if not 0 <= self.max_delay_ms <= 10_000:
            raise ValueError(f"max_delay_ms must be between 0 and 10000 (got {self.max_delay_ms})")


def unbatchable_reason(signature: Signature) -> str | None:
    """Why requests to a model with ``signature`` cannot be concatenated, or None if they can."""
    for spec in (*signature.inputs, *signature.outputs):
        if not spec.shape or spec.shape[0] != -1:
            return f"tensor {spec.name!r} has no wildcard first dimension (shape {list(spec.shape)})"
        if any(d == -1 for d in spec.shape[1:]):
            return f"tensor {spec.name!r} has a wildcard dimension after the first (shape {list(spec.shape)})"
    return None


def request_rows(arrays: Mapping[str, np.ndarray]) -> int | None:
    """The common first dimension of a request's inputs, or None if they disagree (such a request runs alone)."""
    rows = {a.shape[0] if a.ndim else -1 for a in arrays.values()}
    if len(rows) != 1:
        return None
    (count,) = rows
    return count if count >= 0 else None


class _Pending:
    __slots__ = ("arrays", "enqueued", "future", "rows", "waited")

    def __init__(self, arrays: dict[str, np.ndarray], rows: int, future: asyncio.Future[list[OutputTensor]]) -> None:
        self.arrays = arrays
        self.rows = rows
        self.future = future
        self.enqueued = future.get_loop().time()
        #: Seconds from queueing to the start of its batch (set when the batch starts).
        self.waited = 0.0


class Batcher:
    """Collects requests for one model on the event loop and predicts them in batches."""

    def __init__(
        self,
        options: BatchingOptions,
        predict: BatchPredict,
        registry: CollectorRegistry,
        labels: Mapping[str, str],
    ) -> None:
        self.options = options
        self._predict = predict
        self._queue: list[_Pending] = []
        self._rows = 0
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        names = sorted(labels)
        self._labels = [labels[n] for n in names]
        self._size = Histogram(
            "hydro_runtime_batch_size",
            "Rows per predict call made by the adaptive batcher",
            names,
            registry=registry,
            buckets=_SIZE_BUCKETS,
        )
        self._requests = Histogram(
            "hydro_runtime_batch_requests",
            "Requests per predict call made by the adaptive batcher",
            names,
            registry=registry,
            buckets=_SIZE_BUCKETS,
        )
        self._queue_time = Histogram(
            "hydro_runtime_batch_queue_seconds",
            "Time a request waited in the batching queue before its batch started",
            names,
            registry=registry,
            buckets=_QUEUE_BUCKETS,
        )
        self._fallbacks = Counter(
            "hydro_runtime_batch_fallbacks",
            "Batches whose predict failed and whose requests were then predicted one by one",
            names,
            registry=registry,
        )

    @property
    def queued(self) -> int:
        """Requests waiting for their batch to start."""
        return len(self._queue)

    async def submit(self, arrays: dict[str, np.ndarray], rows: int) -> tuple[list[OutputTensor], float]:
        """Predict ``arrays`` (``rows`` rows) as part of a batch: every output, with this request's rows only, and
        the seconds the request waited for its batch to start (queue time, in the statistics)."""
        loop = asyncio.get_running_loop()
        if rows >= self.options.max_batch_size:
            # A full batch on its own: waiting for company would only add latency.
            self._observe([], rows, 1)
            return await self._predict(arrays, rows), 0.0
        if self._rows + rows > self.options.max_batch_size:
            self._flush()
        item = _Pending(arrays, rows, loop.create_future())
        self._queue.append(item)
        self._rows += rows
        if self._rows >= self.options.max_batch_size or self.options.max_delay_ms == 0:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.options.max_delay_ms / 1000, self._flush)
        return await item.future, item.waited

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        items, self._queue, self._rows = self._queue, [], 0
        if not items:
            return
        task = asyncio.get_running_loop().create_task(self._run(items), name="batch")
        # The loop keeps only weak references to tasks.
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _observe(self, items: list[_Pending], rows: int, requests: int) -> None:
        self._size.labels(*self._labels).observe(rows)
        self._requests.labels(*self._labels).observe(requests)
        if items:
            now = items[0].future.get_loop().time()
            queue_time = self._queue_time.labels(*self._labels)
            for item in items:
                item.waited = now - item.enqueued
                queue_time.observe(item.waited)

    async def _run(self, items: list[_Pending]) -> None:
        # A caller that went away (cancelled) does not need its rows predicted.
        items = [item for item in items if not item.future.done()]
        if not items:
            return
        total = sum(item.rows for item in items)
        self._observe(items, total, len(items))
        if len(items) == 1:
            await self._settle_alone(items[0])
            return
        names = list(items[0].arrays)
        batch = {name: np.concatenate([item.arrays[name] for item in items]) for name in names}
        try:
            outputs = await self._predict(batch, total)
            for tensor in outputs:
                if tensor.data.ndim == 0 or tensor.data.shape[0] != total:
                    raise PredictError(
                        f"output {tensor.name!r} has shape {list(tensor.data.shape)} for a batch of {total} rows: "
                        "a batched model must return one row per input row"
                    )
        except Exception as exc:
            # Someone's data made the model fail (or the model cannot batch): give every request its own answer.
            log.info("batch of %d requests failed (%s); predicting them one by one", len(items), exc)
            self._fallbacks.labels(*self._labels).inc()
            await asyncio.gather(*(self._settle_alone(item) for item in items))
            return
        start = 0
        for item in items:
            end = start + item.rows
            if not item.future.done():
                item.future.set_result([OutputTensor(t.name, t.datatype, t.data[start:end]) for t in outputs])
            start = end

    async def _settle_alone(self, item: _Pending) -> None:
        try:
            result = await self._predict(item.arrays, item.rows)
        except Exception as exc:
            if not item.future.done():
                item.future.set_exception(exc)
            return
        if not item.future.done():
            item.future.set_result(result)
