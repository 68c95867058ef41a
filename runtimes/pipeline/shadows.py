"""Shadow calls: a copy of a stage's input sent to other model versions, whose answers are only compared.

The caller never waits for a shadow, and does not even share its event loop turn with one: the executor only
records which stage requests are to be shadowed (:class:`StageShadows`, a reference, no copy) and the front-end
hands them to :meth:`ShadowRunner.submit` once the caller's answer has been given to the transport (gRPC: the RPC's
done callback; REST: a background task after the body is sent). Each shadow call is then a background task that
builds its own copy of the request; when a shadow already has ``max_in_flight`` calls running the copy is dropped
(and counted) rather than queued. Outcomes are Prometheus metrics per (app, stage, shadow).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from protos import inference_pb2 as pb
from runtimes.errors import InferenceError
from runtimes.pipeline.outbound import InferCall
from runtimes.pipeline.spans import Metadata, record_outcome, shadow_span, trace_metadata
from runtimes.pipeline.wire import WireTensor, agree, response_outputs
from tracing.provider import active_tracer

log = logging.getLogger(__name__)

#: Outbound requests to one exact model version carry ``{model}/{version}`` in this header (shadow routes).
MODEL_VERSION_HEADER = "x-hydro-model-version"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True, slots=True)
class StageShadows:
    """One stage's request, still to be copied to each of its shadows once the caller has its answer."""

    stage: int
    shadows: tuple[str, ...]  # "model:version"
    #: The primary's request to the stage; nobody modifies it after the primary call.
    request: pb.ModelInferRequest
    #: The primary's outputs, which the shadows' are compared with.
    primary: Mapping[str, WireTensor]
    #: The request's context: each shadow call runs in a copy of it (so what the request set there, it sees).
    context: contextvars.Context


class ShadowMetrics:
    """The shadow metrics of one pipeline runtime, in its own registry (served at /metrics)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["app", "stage", "shadow"]
        self.calls = Counter(
            "hydro_shadow_calls",
            "Shadow calls answered or failed, by outcome: agree, disagree (outputs differ from the primary's), error",
            [*labels, "outcome"],
            registry=registry,
        )
        self.dropped = Counter(
            "hydro_shadow_dropped", "Shadow calls not sent: too many already in flight", labels, registry=registry
        )
        self.latency = Histogram(
            "hydro_shadow_latency_seconds",
            "Time from sending a shadow call to its answer or error",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.agreement = Gauge(
            "hydro_shadow_agreement_ratio",
            "Share of answered shadow calls whose outputs matched the primary's (allclose for floats)",
            labels,
            registry=registry,
        )
        self.in_flight = Gauge("hydro_shadow_in_flight", "Shadow calls running now", labels, registry=registry)


class ShadowRunner:
    """Sends shadow copies in the background. Used from one event loop only (no locks)."""

    def __init__(
        self, app: str, call: InferCall, metrics: ShadowMetrics, *, max_in_flight: int = 32, timeout: float = 10.0
    ) -> None:
        self._app = app
        self._call = call
        self._metrics = metrics
        self._max_in_flight = max_in_flight
        self._timeout = timeout
        self._in_flight: dict[tuple[int, str], int] = {}
        self._agreed: dict[tuple[int, str], tuple[int, int]] = {}  # (agreeing, answered)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def submit(self, pending: Iterable[StageShadows]) -> None:
        """Start one background call per shadow of each stage in ``pending`` (call it after the caller's answer)."""
        if self._closed:
            # A call's done callback can come after shutdown began: its shadows are not sent.
            return
        for stage in pending:
            for shadow in stage.shadows:
                key = (stage.stage, shadow)
                labels = (self._app, str(stage.stage), shadow)
                if self._in_flight.get(key, 0) >= self._max_in_flight:
                    self._metrics.dropped.labels(*labels).inc()
                    continue
                self._in_flight[key] = self._in_flight.get(key, 0) + 1
                self._metrics.in_flight.labels(*labels).inc()
                task = asyncio.create_task(
                    self._shadow(key, labels, stage.request, stage.primary), context=stage.context.copy()
                )
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _shadow(
        self,
        key: tuple[int, str],
        labels: tuple[str, str, str],
        request: pb.ModelInferRequest,
        primary: Mapping[str, WireTensor],
    ) -> None:
        tracer = active_tracer()
        if tracer is None:
            await self._send(key, labels, request, primary, ())
            return
        with shadow_span(tracer, self._app, key[0], key[1]) as span:
            record_outcome(span, await self._send(key, labels, request, primary, trace_metadata(span)))

    async def _send(
        self,
        key: tuple[int, str],
        labels: tuple[str, str, str],
        request: pb.ModelInferRequest,
        primary: Mapping[str, WireTensor],
        trace_context: Metadata,
    ) -> str:
        """Send one shadow copy and count its outcome: agree, disagree or error."""
        model, _, version = key[1].rpartition(":")
        copy = pb.ModelInferRequest()
        copy.CopyFrom(request)
        copy.model_name, copy.model_version = model, version
        started = time.perf_counter()
        try:
            response = await self._call(
                copy,
                timeout=self._timeout,
                metadata=((MODEL_VERSION_HEADER, f"{model}/{version}"), *trace_context),
            )
            outputs = response_outputs(response)
            matched = all(agree(tensor, outputs.get(name)) for name, tensor in primary.items())
        except (grpc.aio.AioRpcError, InferenceError) as exc:
            log.debug("shadow %s of %s stage %d failed: %s", key[1], self._app, key[0], exc)
            self._metrics.calls.labels(*labels, "error").inc()
            return "error"
        finally:
            self._metrics.latency.labels(*labels).observe(time.perf_counter() - started)
            self._in_flight[key] -= 1
            self._metrics.in_flight.labels(*labels).dec()
        outcome = "agree" if matched else "disagree"
        self._metrics.calls.labels(*labels, outcome).inc()
        agreeing, answered = self._agreed.get(key, (0, 0))
        agreeing, answered = agreeing + matched, answered + 1
        self._agreed[key] = (agreeing, answered)
        self._metrics.agreement.labels(*labels).set(agreeing / answered)
        return outcome

    async def close(self) -> None:
        """Cancel the shadow calls still running (shutdown: nobody waits for them); later submits send nothing."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
