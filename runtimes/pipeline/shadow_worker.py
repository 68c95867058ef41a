"""The shadow worker: a process of its own that makes a pipeline runtime's shadow calls and compares their answers.

``python -m runtimes.pipeline.shadow_worker --app APP --outbound HOST:PORT`` with a socket as stdin; only the
pipeline runtime starts it (runtimes.pipeline.shadows.ShadowRunner). It reads jobs from stdin, sends each shadow
call through the sidecar's outbound listener on a connection of its own, compares the answer with the primary's and
writes the outcomes back on the same socket in batches (runtimes.pipeline.shadow_frames). The runtime's event loop
thus never sends, awaits or compares a shadow call: it writes one frame per shadowed stage and, a few times a
second, reads a batch of reports into its metrics.

The end of stdin ends the worker (the runtime closed it, stopped or died): calls still running are cancelled.
SIGTERM and SIGINT are ignored, so a signal to the runtime's whole process group lets the runtime shut its worker
down itself. The worker runs at a nice value 10 above the runtime's. A bad frame is a bug on one side: the
worker logs it and exits 1 (the runtime starts another).
Tracing is set up from the same OTEL_* environment as the runtime's, under the runtime's service name: each
shadow span is the child of the caller's request span, whose ``traceparent`` comes with the job.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
import uvloop

from protos import inference_pb2 as pb
from runtimes.errors import InferenceError
from runtimes.pipeline.outbound import OutboundChannel
from runtimes.pipeline.shadow_frames import (
    DROPPED,
    FrameError,
    ShadowJob,
    ShadowReport,
    decode_job,
    encode_reports,
    read_frame,
)
from runtimes.pipeline.spans import (
    Metadata,
    grpc_metadata,
    record_outcome,
    remote_parent,
    shadow_span,
    trace_metadata,
)
from runtimes.pipeline.wire import WireTensor, agree, response_outputs
from runtimes.server import LOG_LEVELS, configure_logging
from runtimes.spans import REQUEST_ID_HEADER
from tracing.provider import active_tracer, setup_tracing
from tracing.settings import InvalidEndpoint

log = logging.getLogger("runtimes.pipeline.shadow_worker")

#: Outbound requests to one exact model version carry ``{model}/{version}`` in this header (shadow routes).
MODEL_VERSION_HEADER = "x-hydro-model-version"
#: Added to the worker's nice value: on a busy machine its CPU goes to the processes answering callers first.
NICENESS = 10
#: Reports wait this long to go back in one frame with the others that finish meanwhile.
REPORT_INTERVAL = 0.05
#: ... or as soon as this many are waiting.
REPORT_BATCH = 16


@dataclass(frozen=True)
class WorkerOptions:
    """Command-line options of ``python -m runtimes.pipeline.shadow_worker``: the settings it shares with the
    pipeline runtime, which starts it with ``argv()``."""

    app: str
    outbound: str
    timeout: float = 10.0
    max_message_bytes: int = 64 * 2**20
    log_level: str = "info"
    #: Seconds between a job's arrival and its calls (the runtime's ``--shadow-delay``; see ShadowCaller).
    delay: float = 0.005

    def argv(self) -> list[str]:
        """The worker's command line."""
        return [
            *(sys.executable, "-m", "runtimes.pipeline.shadow_worker", "--app", self.app),
            *("--outbound", self.outbound, "--timeout", str(self.timeout)),
            *("--max-message-bytes", str(self.max_message_bytes), "--log-level", self.log_level),
            *("--delay", str(self.delay)),
        ]


def parse_args(argv: Sequence[str] | None = None) -> WorkerOptions:
    """Parse the worker's arguments (the runtime passes its own settings on)."""
    parser = argparse.ArgumentParser(
        prog="python -m runtimes.pipeline.shadow_worker",
        description="Shadow calls of one pipeline runtime; jobs come on stdin (a socket), reports go back on it.",
    )
    parser.add_argument("--app", required=True, help="the application's name (metrics and spans)")
    parser.add_argument("--outbound", required=True, help="HOST:PORT of the sidecar's outbound listener")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per shadow call (default 10)")
    parser.add_argument("--max-message-bytes", type=int, default=64 * 2**20, help="largest message in bytes")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    parser.add_argument(
        "--delay",
        type=float,
        default=WorkerOptions.delay,
        help=f"seconds between a job's arrival and its calls (default {WorkerOptions.delay})",
    )
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    if args.delay < 0:
        parser.error("--delay must not be negative")
    if args.max_message_bytes < 1:
        parser.error("--max-message-bytes must be positive")
    return WorkerOptions(args.app, args.outbound, args.timeout, args.max_message_bytes, args.log_level, args.delay)


class _Reporter:
    """Collects outcome reports and writes them to the runtime in one frame per REPORT_INTERVAL."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._pending: list[ShadowReport] = []
        self._scheduled: asyncio.TimerHandle | None = None

    def add(self, report: ShadowReport) -> None:
        self._pending.append(report)
        if len(self._pending) >= REPORT_BATCH:
            # A copy holds its place under the runtime's in-flight cap until reported: do not sit on many.
            self.flush()
        elif self._scheduled is None:
            self._scheduled = asyncio.get_running_loop().call_later(REPORT_INTERVAL, self.flush)

    def flush(self) -> None:
        """Send what is pending now (also on the way out)."""
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        if self._pending and not self._writer.is_closing():
            self._writer.write(encode_reports(self._pending))
        self._pending = []


class ShadowCaller:
    """Makes the shadow calls of the jobs it is given, each in a task of its own, and reports how they ended."""

    def __init__(
        self, app: str, channel: OutboundChannel, reporter: _Reporter, timeout: float, delay: float = 0.0
    ) -> None:
        self._app = app
        self._delay = delay
        self._channel = channel
        self._reporter = reporter
        self._timeout = timeout
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, job: ShadowJob) -> None:
        """One task per shadow of ``job``; the primary's outputs are decoded once for all of them."""
        try:
            primary = response_outputs(pb.ModelInferResponse.FromString(job.primary))
        except Exception as exc:  # a bad primary is the runtime's bug: every shadow of the job is an error
            log.error("shadow job of stage %d has unreadable primary outputs: %s", job.stage, exc)
            for shadow in job.shadows:
                self._reporter.add(ShadowReport(job.stage, shadow, "error", 0.0))
            return
        for shadow in job.shadows:
            task = asyncio.create_task(self._shadow(job, shadow, primary))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _shadow(self, job: ShadowJob, shadow: str, primary: Mapping[str, WireTensor]) -> None:
        if self._delay:
            # The caller's answer is still on its way out through the same sidecar (and the ingress): the copies
            # start once it has gone, instead of competing with it for the sidecar and the CPU.
            await asyncio.sleep(self._delay)
        outcome, latency = "error", 0.0
        try:
            tracer = active_tracer()
            parent = remote_parent(job.headers) if tracer is not None else None
            if tracer is None or parent is None:
                # Not tracing here (the runtime may be: each process watches its collector on its own): the
                # caller's trace context and request id still go with the copy, as they came (those gRPC takes).
                outcome, latency = await self._send(job, shadow, primary, grpc_metadata(job.headers))
            else:
                with shadow_span(tracer, self._app, job.stage, shadow, parent) as span:
                    metadata = trace_metadata(span, job.headers.get(REQUEST_ID_HEADER))
                    outcome, latency = await self._send(job, shadow, primary, metadata)
                    record_outcome(span, outcome)
        except asyncio.CancelledError:
            # The worker is stopping: the copy has no outcome, and is reported as dropped (not as a failed call).
            outcome, latency = DROPPED, 0.0
            raise
        except Exception as exc:
            log.warning("shadow %s of %s stage %d failed: %r", shadow, self._app, job.stage, exc)
        finally:
            # Always reported (cancelled on the way out included): an unreported copy would hold its place under
            # the runtime's in-flight cap for as long as this worker lives.
            self._reporter.add(ShadowReport(job.stage, shadow, outcome, latency))

    async def _send(
        self, job: ShadowJob, shadow: str, primary: Mapping[str, WireTensor], trace_context: Metadata
    ) -> tuple[str, float]:
        """Send one shadow copy: its outcome (agree, disagree or error) and how long it took."""
        model, _, version = shadow.rpartition(":")
        started = time.perf_counter()
        try:
            # Parsed per shadow: each copy names its own model version.
            request = pb.ModelInferRequest.FromString(job.request)
            request.model_name, request.model_version = model, version
            response = await self._channel.call(
                request,
                timeout=self._timeout,
                metadata=((MODEL_VERSION_HEADER, f"{model}/{version}"), *trace_context),
            )
            outputs = response_outputs(response)
            matched = all(agree(tensor, outputs.get(name)) for name, tensor in primary.items())
        except (grpc.aio.AioRpcError, InferenceError) as exc:
            log.debug("shadow %s of %s stage %d failed: %s", shadow, self._app, job.stage, exc)
            return "error", time.perf_counter() - started
        except Exception as exc:
            # Unexpected (an unreadable request, say), but still reported: an unreported copy would hold its place
            # under the runtime's in-flight cap for good.
            log.warning("shadow %s of %s stage %d failed: %r", shadow, self._app, job.stage, exc)
            return "error", time.perf_counter() - started
        return ("agree" if matched else "disagree"), time.perf_counter() - started

    async def close(self) -> None:
        """Cancel the calls still running (nobody is left to report them to)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def work(options: WorkerOptions, stdin: socket.socket) -> int:
    """Serve jobs from ``stdin`` until it ends; the exit code."""
    reader, writer = await asyncio.open_connection(sock=stdin)
    channel = OutboundChannel(options.outbound, options.max_message_bytes)
    reporter = _Reporter(writer)
    # An empty report batch says "serving": the runtime reports ready only after it (ShadowRunner.start).
    writer.write(encode_reports([]))
    caller = ShadowCaller(options.app, channel, reporter, options.timeout, options.delay)
    # A job holds a stage request and the primary's outputs, each at most one message.
    limit = 2 * options.max_message_bytes + 2**20
    code = 0
    try:
        while (body := await read_frame(reader, limit)) is not None:
            caller.start(decode_job(body))
    except FrameError as exc:
        log.error("bad frame from the pipeline runtime: %s", exc)
        code = 1
    except ConnectionError as exc:
        log.info("the pipeline runtime's socket failed: %s", exc)
    await caller.close()
    reporter.flush()
    writer.close()
    await channel.close()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m runtimes.pipeline.shadow_worker``."""
    options = parse_args(argv)
    configure_logging(options.log_level)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    # Shadows are best effort: when the CPU is short, the caller's stage calls should get it, not the copies.
    os.nice(NICENESS)
    try:
        stdin = socket.socket(fileno=sys.stdin.fileno())
    except OSError as exc:
        log.critical("stdin must be a socket from the pipeline runtime: %s", exc)
        return 2
    try:
        tracing = setup_tracing(f"pipeline {options.app}", attributes={"hydro.application": options.app})
    except InvalidEndpoint as exc:
        log.critical("tracing: %s", exc)
        return 1
    try:
        return uvloop.run(work(options, stdin))
    finally:
        tracing.shutdown()


if __name__ == "__main__":
    sys.exit(main())
