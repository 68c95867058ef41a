"""Traces only while the collector answers: a collector that is down must cost the request path nothing.

Spans made while nobody can receive them cost CPU twice (making them, then encoding every batch again for each
export retry) and only end up dropped. So the tracer is handed out only while the collector is reachable: an
export failure pauses it, and a probe thread (a gRPC connection attempt every few seconds, no export, no log
noise) resumes it once the collector answers again. A paused process does exactly what it does with tracing off.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from tracing.quiet_export import RateLimitFilter
from tracing.settings import CollectorAddress

log = logging.getLogger("tracing.collector")
# A collector that flaps must not flood the log either; that it answers again is always said.
log.addFilter(RateLimitFilter(min_level=logging.WARNING))

PROBE_INTERVAL_SECONDS = 5.0
PROBE_TIMEOUT_SECONDS = 2.0


class CollectorWatch:
    """Whether the collector is reachable; calls ``on_change(True/False)`` on every transition.

    Thread-safe: exports report from the batch processor's thread, the probe runs on its own daemon thread.
    """

    def __init__(
        self,
        collector: CollectorAddress,
        on_change: Callable[[bool], None],
        interval: float = PROBE_INTERVAL_SECONDS,
    ) -> None:
        self.collector = collector
        self.interval = interval
        self._on_change = on_change
        self._lock = threading.Lock()
        #: None until the first probe or export says (the first answer is logged either way); the tracer is armed
        #: meanwhile, so that the first requests of a process are traced when the collector is there.
        self._up: bool | None = None
        #: time.monotonic() of the last transition to up: an export that started before it and failed (it was
        #: retrying through the outage) says nothing about the collector now.
        self._up_since = float("-inf")
        self._down = threading.Event()
        self._down.set()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._probe_loop, name="tracing-collector-probe", daemon=True)

    @property
    def up(self) -> bool:
        return self._up is True

    @property
    def probed(self) -> bool:
        """Whether a probe or an export has said anything yet."""
        return self._up is not None

    def start(self) -> CollectorWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._down.set()

    def report(self, reachable: bool, started_at: float | None = None) -> None:
        """Record what an export or a probe found out; ``started_at`` (time.monotonic()) is when the attempt
        began, if it may have outlived a transition."""
        with self._lock:
            if reachable == self._up:
                return
            if not reachable and started_at is not None and started_at < self._up_since:
                return
            self._up = reachable
            if reachable:
                self._up_since = time.monotonic()
                self._down.clear()
            else:
                self._down.set()
        if reachable:
            log.info("tracing: the collector at %s answers; spans are exported", self.collector)
        else:
            log.warning(
                "tracing paused: the collector at %s does not answer; retrying every %g s",
                self.collector,
                self.interval,
            )
        self._on_change(reachable)

    def _probe_loop(self) -> None:
        while not self._stopped.is_set():
            # Sleeps while the collector is up: exports are the health signal then.
            self._down.wait()
            if self._stopped.is_set():
                return
            reachable = self._reachable()
            self.report(reachable)
            if not reachable:
                self._stopped.wait(self.interval)

    def _reachable(self) -> bool:
        """Connect to the collector: READY is an answer, and so is TRANSIENT_FAILURE (refused, unreachable), so
        a collector that is down is known as fast as one that is up, not only at the timeout."""
        target = f"{self.collector.host}:{self.collector.port}"
        channel = (
            grpc.secure_channel(target, grpc.ssl_channel_credentials())
            if self.collector.secure
            else grpc.insecure_channel(target)
        )
        answered = threading.Event()
        states: list[grpc.ChannelConnectivity] = []

        def on_state(state: grpc.ChannelConnectivity) -> None:
            if state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE):
                states.append(state)
                answered.set()

        channel.subscribe(on_state, try_to_connect=True)
        try:
            answered.wait(PROBE_TIMEOUT_SECONDS)
            return bool(states) and states[0] == grpc.ChannelConnectivity.READY
        finally:
            channel.unsubscribe(on_state)
            channel.close()


class WatchedExporter(SpanExporter):
    """A span exporter that tells the watch how each export went."""

    def __init__(self, inner: SpanExporter, watch: CollectorWatch) -> None:
        self.inner = inner
        self.watch = watch

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Export through the inner exporter; a failure pauses tracing until the collector answers again."""
        started_at = time.monotonic()
        result = self.inner.export(spans)
        self.watch.report(result == SpanExportResult.SUCCESS, started_at)
        return result

    def shutdown(self) -> None:
        """Stop probing and shut the inner exporter down (which aborts its retries)."""
        self.watch.stop()
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Whatever the inner exporter does."""
        return self.inner.force_flush(timeout_millis)
