"""Cumulative inference statistics of a runtime, in the shape of Triton's statistics extension.

Both protocols report the same numbers: gRPC ModelStatistics and REST ``GET /v2/models/{m}/stats``. Durations are
nanoseconds, as Triton reports them; ``last_inference`` is milliseconds since the epoch.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

#: The keys of Triton's InferStatistics, in its field order.
INFER_STAGES = (
    "success",
    "fail",
    "queue",
    "compute_input",
    "compute_infer",
    "compute_output",
    "cache_hit",
    "cache_miss",
)
#: The keys of Triton's InferBatchStatistics durations.
BATCH_STAGES = ("compute_input", "compute_infer", "compute_output")


@dataclass
class Duration:
    """A count and a total duration in nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        """Count ``count`` more occurrences that took ``ns`` altogether."""
        self.count += count
        if ns > 0:
            self.ns += ns


@dataclass
class Snapshot:
    """The statistics at one moment (a copy: later inferences do not change it)."""

    last_inference_ms: int
    inference_count: int
    execution_count: int
    stages: dict[str, Duration]
    #: batch size -> stage -> duration
    batches: dict[int, dict[str, Duration]] = field(default_factory=dict)


class Statistics:
    """Thread-safe counters: requests finish on the event loop, predictions on worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_inference_ms = 0
        self._inference_count = 0
        self._execution_count = 0
        self._stages = {stage: Duration() for stage in INFER_STAGES}
        self._batches: dict[int, dict[str, Duration]] = {}

    def record_execution(self, batch_size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One model execution over ``batch_size`` inferences (1 per request unless requests are batched)."""
        with self._lock:
            self._record_execution(batch_size, input_ns, infer_ns, output_ns)

    def _record_execution(self, batch_size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        self._execution_count += 1
        batch = self._batches.get(batch_size)
        if batch is None:
            batch = self._batches[batch_size] = {stage: Duration() for stage in BATCH_STAGES}
        batch["compute_input"].add(input_ns)
        batch["compute_infer"].add(infer_ns)
        batch["compute_output"].add(output_ns)

    def record_success(
        self, total_ns: int, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int, *, inferences: int = 1
    ) -> None:
        """One successful inference request and how long each stage of it took; ``inferences`` is what it adds to
        ``inference_count`` (Triton counts each row of a batched model's request as one inference)."""
        now_ms = time.time_ns() // 1_000_000
        with self._lock:
            self._record_success(now_ms, total_ns, queue_ns, input_ns, infer_ns, output_ns, inferences)

    def record_request(self, total_ns: int, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One successful unbatched request: its stages and its own execution (batch size 1, Triton's terms for a
        model with max_batch_size 0). The same as record_success plus record_execution, under one lock."""
        now_ms = time.time_ns() // 1_000_000
        with self._lock:
            self._record_success(now_ms, total_ns, queue_ns, input_ns, infer_ns, output_ns, 1)
            self._record_execution(1, input_ns, infer_ns, output_ns)

    def _record_success(
        self, now_ms: int, total_ns: int, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int, inferences: int
    ) -> None:
        # max: threads take now_ms before the lock, so a later recording can carry an earlier time.
        self._last_inference_ms = max(self._last_inference_ms, now_ms)
        self._inference_count += inferences
        stages = self._stages
        stages["success"].add(total_ns)
        stages["queue"].add(queue_ns)
        stages["compute_input"].add(input_ns)
        stages["compute_infer"].add(infer_ns)
        stages["compute_output"].add(output_ns)

    def record_failure(self, total_ns: int) -> None:
        """One inference request that failed (bad input, model error, not ready)."""
        with self._lock:
            self._last_inference_ms = time.time_ns() // 1_000_000
            self._stages["fail"].add(total_ns)

    def snapshot(self) -> Snapshot:
        """A consistent copy of every counter."""
        with self._lock:
            return Snapshot(
                last_inference_ms=self._last_inference_ms,
                inference_count=self._inference_count,
                execution_count=self._execution_count,
                stages={k: Duration(v.count, v.ns) for k, v in self._stages.items()},
                batches={
                    size: {k: Duration(v.count, v.ns) for k, v in stages.items()}
                    for size, stages in sorted(self._batches.items())
                },
            )


def snapshot_json(name: str, version: str, snapshot: Snapshot) -> dict[str, Any]:
    """One entry of Triton's REST ``model_stats`` list."""

    def duration(d: Duration) -> dict[str, int]:
        return {"count": d.count, "ns": d.ns}

    return {
        "name": name,
        "version": version,
        "last_inference": snapshot.last_inference_ms,
        "inference_count": snapshot.inference_count,
        "execution_count": snapshot.execution_count,
        "inference_stats": {stage: duration(d) for stage, d in snapshot.stages.items()},
        "batch_stats": [
            {"batch_size": size, **{stage: duration(d) for stage, d in stages.items()}}
            for size, stages in snapshot.batches.items()
        ],
    }
