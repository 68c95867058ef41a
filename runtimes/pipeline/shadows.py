"""Shadow calls: a copy of a stage's input sent to other model versions, whose answers are only compared.

The caller never waits for a shadow, and the pipeline runtime's event loop does not make shadow calls at all: the
executor only records which stage requests are to be shadowed (:class:`StageShadows`, a reference, no copy), the
front-end hands them to :meth:`ShadowRunner.submit` once the caller's answer has been given to the transport (gRPC:
the RPC's done callback; REST: a background task after the body is sent), and submit writes one frame per shadowed
stage to the shadow worker, a process of the runtime's own (runtimes.pipeline.shadow_worker), which makes the calls,
compares the answers and reports the outcomes back in batches. The runtime counts them in Prometheus metrics per
(app, stage, shadow), served at its /metrics.

Nothing shadowed queues without bound or waits: a copy is dropped (and counted) when its shadow already has
``max_in_flight`` calls unreported, when the worker does not read its socket fast enough, or while no worker
serves (a new one serves once its first, empty report batch comes). A worker that exits is logged once and started
again after a back-off (0.5 s doubling to 30 s, back to 0.5 s once one has run for a minute); its unreported calls
are counted as dropped. A worker that is alive but useless is killed, and so started again: one that serves but has
reported nothing for longer than a call may take while copies are in flight (stopped, deadlocked: every call has a
deadline, so a working worker is never that quiet), or one that has not started serving within 30 s. The worker
ends when its socket does, so it never outlives the runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from protos import inference_pb2 as pb
from runtimes.pipeline.shadow_frames import (
    CALL_OUTCOMES,
    DROPPED,
    FrameError,
    ShadowJob,
    ShadowReport,
    decode_reports,
    encode_job,
    read_frame,
)
from runtimes.pipeline.shadow_worker import WorkerOptions
from runtimes.pipeline.spans import propagation_headers
from runtimes.pipeline.wire import WireTensor
from tracing.provider import active_tracer

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Report batches are small JSON lists; a bigger frame is a broken worker.
_REPORT_LIMIT = 16 * 2**20
_FIRST_RESTART_DELAY = 0.5
_LAST_RESTART_DELAY = 30.0
#: A worker that ran this long resets the restart back-off.
_STABLE_SECONDS = 60.0
#: Seconds a worker gets to finish after its socket is closed, before it is killed.
_STOP_GRACE = 3.0
#: Seconds start() waits for the worker to serve (imports take ~1 s) before the runtime serves without it.
_START_TIMEOUT = 30.0
#: Seconds of silence, beyond a shadow call's deadline and delay, after which a worker with copies in flight is
#: taken for wedged: room for a report batch's interval and a loaded machine's scheduling.
_SILENCE_GRACE = 5.0
#: How often the watchdog looks.
_WATCH_INTERVAL = 0.5


def _kill(process: asyncio.subprocess.Process) -> None:
    """SIGKILL the worker; one that exited meanwhile (uvloop then raises ProcessLookupError) is left as it is."""
    with contextlib.suppress(ProcessLookupError):
        process.kill()


@dataclass(frozen=True, slots=True)
class StageShadows:
    """One stage's request, still to be copied to each of its shadows once the caller has its answer."""

    stage: int
    shadows: tuple[str, ...]  # "model:version"
    #: The primary's request to the stage; nobody modifies it after the primary call.
    request: pb.ModelInferRequest
    #: The primary's outputs, which the shadows' are compared with.
    primary: Mapping[str, WireTensor]
    #: The request's context, whose current span and request id the shadow calls' trace headers are made from.
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
            "hydro_shadow_dropped",
            "Shadow calls not made: too many already in flight, or the shadow worker behind or down",
            labels,
            registry=registry,
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
        self.in_flight = Gauge(
            "hydro_shadow_in_flight",
            "Shadow calls handed to the worker and not yet reported",
            labels,
            registry=registry,
        )


class _Series:
    """One (stage, shadow)'s state and its metric children, bound once: label lookups cost a lock and a hash each."""

    def __init__(self, metrics: ShadowMetrics, app: str, stage: int, shadow: str) -> None:
        labels = (app, str(stage), shadow)
        self.dropped = metrics.dropped.labels(*labels)
        self.latency = metrics.latency.labels(*labels)
        self.agreement = metrics.agreement.labels(*labels)
        self.in_flight_gauge = metrics.in_flight.labels(*labels)
        self.shadow = shadow
        self.outcomes = {outcome: metrics.calls.labels(*labels, outcome) for outcome in CALL_OUTCOMES}
        #: Copies handed to the worker and not yet reported.
        self.in_flight = 0
        self.agreeing = 0
        self.answered = 0

    def sent(self) -> None:
        self.in_flight += 1
        self.in_flight_gauge.inc()

    def reported(self, report: ShadowReport) -> None:
        if self.in_flight > 0:
            self.in_flight -= 1
            self.in_flight_gauge.dec()
        if report.outcome == DROPPED:
            self.dropped.inc()
            return
        self.latency.observe(report.latency)
        self.outcomes[report.outcome].inc()
        if report.outcome != "error":
            self.agreeing += report.outcome == "agree"
            self.answered += 1
            self.agreement.set(self.agreeing / self.answered)

    def drop_unreported(self) -> None:
        """The copies handed over count as dropped (their worker exited without reporting them)."""
        if self.in_flight:
            self.dropped.inc(self.in_flight)
            self.in_flight_gauge.dec(self.in_flight)
            self.in_flight = 0


def _primary_message(outputs: Mapping[str, WireTensor]) -> bytes:
    """The primary's outputs as the worker reads them: a ModelInferResponse with raw contents."""
    message = pb.ModelInferResponse()
    for tensor in outputs.values():
        message.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        message.raw_output_contents.append(tensor.raw)
    return message.SerializeToString()


class ShadowRunner:
    """Hands shadow copies to the shadow worker and counts what it reports. Used from one event loop only (no locks).

    ``start`` starts the worker (and keeps one running), ``close`` stops it; ``submit`` never blocks and never
    fails: what cannot be handed over now is dropped and counted.
    """

    def __init__(
        self,
        command: WorkerOptions,
        metrics: ShadowMetrics,
        *,
        max_in_flight: int = 32,
        max_buffered_bytes: int = 8 * 2**20,
    ) -> None:
        self._command = command
        self._app = command.app
        self._metrics = metrics
        self._max_in_flight = max_in_flight
        self._max_buffered = max_buffered_bytes
        self._series: dict[tuple[int, str], _Series] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        #: Set once the first worker was spawned, or could not be.
        self._first_attempt = asyncio.Event()
        self._closed = False
        #: Whether the running worker has sent its first report batch: copies go to it only from then on, so a
        #: worker still importing is never charged with them.
        self._serving = False
        #: time.monotonic() of the running worker's last report batch (or of its start).
        self._last_report = 0.0
        #: Seconds of silence after which a serving worker with copies in flight is killed (see _watch).
        self._silence_limit = command.timeout + command.delay + _SILENCE_GRACE

    async def start(self) -> None:
        """Start the worker (and a task that starts it again if it exits); returns once it serves (its first, empty
        report batch came: until then copies would pile up unreported and be dropped), or failed to start (the
        runtime serves without shadows meanwhile: they are dropped and counted)."""
        self._supervisor = asyncio.create_task(self._supervise(), name="shadow-worker")
        try:
            await asyncio.wait_for(self._first_attempt.wait(), _START_TIMEOUT)
        except TimeoutError:
            log.warning(
                "the shadow worker did not start within %.0f s: serving, shadows dropped meanwhile", _START_TIMEOUT
            )

    def submit(self, pending: Iterable[StageShadows]) -> None:
        """Hand each stage in ``pending`` to the worker (call it after the caller's answer); drop what cannot go."""
        if self._closed:
            # A call's done callback can come after shutdown began: its shadows are not sent.
            return
        writer = self._writer if self._serving else None
        if writer is not None and (
            writer.is_closing() or writer.transport.get_write_buffer_size() > self._max_buffered
        ):
            writer = None
        for stage in pending:
            sendable: list[_Series] = []
            for shadow in stage.shadows:
                series = self._series_of(stage.stage, shadow)
                if writer is None or series.in_flight >= self._max_in_flight:
                    series.dropped.inc()
                else:
                    sendable.append(series)
            if not sendable or writer is None:
                continue
            headers = stage.context.run(propagation_headers) if active_tracer() is not None else {}
            shadows = stage.shadows if len(sendable) == len(stage.shadows) else tuple(s.shadow for s in sendable)
            request, primary = stage.request.SerializeToString(), _primary_message(stage.primary)
            writer.write(encode_job(ShadowJob(stage.stage, shadows, headers, request, primary)))
            for series in sendable:
                series.sent()

    def _series_of(self, stage: int, shadow: str) -> _Series:
        series = self._series.get((stage, shadow))
        if series is None:
            series = self._series[(stage, shadow)] = _Series(self._metrics, self._app, stage, shadow)
        return series

    def _record(self, reports: Sequence[ShadowReport]) -> None:
        for report in reports:
            self._series_of(report.stage, report.shadow).reported(report)

    async def _supervise(self) -> None:
        delay = _FIRST_RESTART_DELAY
        while not self._closed:
            began = time.monotonic()
            try:
                code = await self._run_worker()
            except Exception as exc:
                # Cannot even start it (no fork, a bad interpreter): shadows stay dropped, the caller never knows.
                log.error("cannot run the shadow worker: %s", exc)
                code = None
            self._first_attempt.set()
            if self._closed:
                return
            if time.monotonic() - began >= _STABLE_SECONDS:
                delay = _FIRST_RESTART_DELAY
            log.warning(
                "the shadow worker of %r exited (code %s); shadow copies are dropped until it is started again in "
                "%.1f s",
                self._app,
                code,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, _LAST_RESTART_DELAY)

    async def _run_worker(self) -> int:
        """Run one worker until it exits: its exit code."""
        ours, theirs = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(*self._command.argv(), stdin=theirs.fileno())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._process = process
        try:
            reader, writer = await asyncio.open_connection(sock=ours)
        except BaseException:
            ours.close()
            _kill(process)
            await process.wait()
            raise
        self._writer = writer
        if self._closed:  # close() came while this was spawning: the worker's end of input is due now
            writer.close()
        log.info("shadow worker started (pid %d)", process.pid)
        self._last_report = time.monotonic()
        watchdog = asyncio.create_task(self._watch(process), name="shadow-worker-watchdog")
        try:
            while (body := await read_frame(reader, _REPORT_LIMIT)) is not None:
                self._last_report = time.monotonic()
                self._serving = True
                self._record(decode_reports(body))
                self._first_attempt.set()
        except FrameError as exc:
            if self._closed:  # close() shut the socket inside a frame: the worker is stopping anyway
                log.debug("the shadow worker's last reports are cut off: %s", exc)
            else:
                log.error("the shadow worker's reports are unreadable (%s): stopping it", exc)
                _kill(process)
        except ConnectionError as exc:
            # A worker that died with jobs unread resets the socket: the same as its end.
            log.debug("the shadow worker's socket failed: %s", exc)
        finally:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
            self._serving = False
            self._writer = None
            writer.close()
            # The worker exits at the end of its input (close() kills it if it takes too long); one that does not
            # is wedged, and is killed here so that it is started again.
            try:
                code = await asyncio.wait_for(asyncio.shield(process.wait()), _STOP_GRACE)
            except TimeoutError:
                log.warning("the shadow worker did not exit within %.0f s of its input's end: killing it", _STOP_GRACE)
                _kill(process)
                code = await process.wait()
            if not self._closed:
                for series in self._series.values():
                    series.drop_unreported()
        return code

    async def _watch(self, process: asyncio.subprocess.Process) -> None:
        """Kill ``process`` when it is alive but useless, so that it is started again: it has not sent its first
        report within _START_TIMEOUT, or it serves, has copies in flight and has reported nothing for
        ``_silence_limit`` seconds (every call has a deadline, so a working worker is never that quiet).

        Either would otherwise hold every shadow at its in-flight cap, or keep shadows dropped, for good, with
        nothing to restart it. Silence counts from its last report, or from the last look that found no copy in
        flight, whichever is later (an idle worker has nothing to report).
        """
        spawned = idle_until = time.monotonic()
        while True:
            await asyncio.sleep(_WATCH_INTERVAL)
            if process.returncode is not None:
                return
            now = time.monotonic()
            if not self._serving:
                if now - spawned <= _START_TIMEOUT:
                    continue
                reason = f"has not started serving within {_START_TIMEOUT:.0f} s"
            else:
                in_flight = sum(series.in_flight for series in self._series.values())
                if in_flight == 0:
                    idle_until = now
                    continue
                silent = now - max(idle_until, self._last_report)
                if silent <= self._silence_limit:
                    continue
                reason = f"reported nothing for {silent:.0f} s with {in_flight} copies in flight"
            log.warning("the shadow worker of %r (pid %d) %s: killing it", self._app, process.pid, reason)
            # It may have exited since the look above.
            _kill(process)
            return

    async def close(self) -> None:
        """Stop the worker: its socket ends, it cancels its calls and exits (killed after a few seconds if not).

        Later submits send nothing.
        """
        self._closed = True
        writer, process, supervisor = self._writer, self._process, self._supervisor
        if writer is not None and not writer.is_closing():
            writer.close()
        if process is not None and process.returncode is None:
            try:
                await asyncio.wait_for(process.wait(), _STOP_GRACE)
            except TimeoutError:
                log.warning("the shadow worker did not stop within %.0f s: killing it", _STOP_GRACE)
                _kill(process)
                await process.wait()
        if supervisor is not None:
            supervisor.cancel()
            await asyncio.gather(supervisor, return_exceptions=True)
