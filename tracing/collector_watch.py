"""Traces only while the collector answers: a collector that is down must cost the request path nothing.

Spans made while nobody can receive them cost CPU twice (making them, then encoding every batch again for each
export retry) and only end up dropped. So the tracer is handed out only while the collector is reachable: an
export failure pauses it, and a probe thread (a gRPC connection attempt every few seconds, no export, no log
noise) resumes it once the collector answers again. A paused process does exactly what it does with tracing off.

A watch whose owner exports nothing itself (xds_control: the Envoys export, not it) has no export to report a
failure, so it keeps probing while the collector is up too (``probe_while_up``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from tracing.quiet_export import RateLimitFilter
from tracing.settings import CollectorAddress, trusted_ca_file

log = logging.getLogger("tracing.collector")
# A collector that flaps must not flood the log either; that it answers again is always said.
log.addFilter(RateLimitFilter(min_level=logging.WARNING))

PROBE_INTERVAL_SECONDS = 5.0
PROBE_TIMEOUT_SECONDS = 2.0
#: Probes in a row without an answer before a collector that was up counts as down (probing while up only).
DOWN_AFTER_MISSES = 2
CONFIRM_SECONDS = 1.0


def tls_credentials(collector: CollectorAddress) -> grpc.ChannelCredentials:
    """TLS credentials trusting the CAs the Envoys trust too (tracing.settings.trusted_ca_file): the probe's and
    the exporter's. OSError when that file cannot be read."""
    ca_file = trusted_ca_file(collector)
    if ca_file is None:
        return grpc.ssl_channel_credentials()
    return grpc.ssl_channel_credentials(Path(ca_file).read_bytes())


class CollectorWatch:
    """Whether the collector is reachable; calls ``on_change(True/False)`` on every transition.

    Thread-safe: exports report from the batch processor's thread, the probe runs on its own daemon thread.
    ``on_change`` is called under the watch's lock, so transitions are delivered one at a time and in the order
    they happened (the last call always says the current state): it must be quick (an assignment, a
    ``call_soon_threadsafe``) and must not call back into the watch.

    ``probe_while_up``: probe every ``interval`` while the collector is up too, for an owner whose own exports do
    not tell (or that makes none); then the collector counts as down after ``DOWN_AFTER_MISSES`` probes in a row
    without an answer, the next one ``CONFIRM_SECONDS`` after the first.
    """

    def __init__(
        self,
        collector: CollectorAddress,
        on_change: Callable[[bool], None],
        interval: float = PROBE_INTERVAL_SECONDS,
        *,
        probe_while_up: bool = False,
    ) -> None:
        self.collector = collector
        self.interval = interval
        self.probe_while_up = probe_while_up
        self._on_change = on_change
        self._lock = threading.Lock()
        #: None until the first probe or export says (the first answer is logged either way); the tracer is armed
        #: meanwhile, so that the first requests of a process are traced when the collector is there.
        self._up: bool | None = None
        #: time.monotonic() of the last transition to up: an export that started before it, or within a probe
        #: interval after it, and failed (it was retrying through the outage, or its channel had not reconnected
        #: yet) says nothing about the collector now.
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
            if not reachable and started_at is not None and started_at < self._up_since + self.interval:
                # Began before the collector was seen back, or so soon after that the exporter's own channel may
                # still be waiting out its reconnect back-off (capped at the probe interval, tracing.settings) and
                # failed without trying: stale news. Believed, it paused tracing again a moment after it resumed.
                return
            self._up = reachable
            if reachable:
                self._up_since = time.monotonic()
                self._down.clear()
            else:
                self._down.set()
            # Under the lock: delivered outside it, a thread that set the state and was then held up (logging,
            # scheduling) could deliver its news after a later transition's, leaving the owner in a state the
            # watch no longer has, with nobody probing to correct it.
            self._on_change(reachable)
        if reachable:
            log.info("tracing: the collector at %s answers; spans are exported", self.collector)
        else:
            log.warning(
                "tracing paused: the collector at %s does not answer; retrying every %g s",
                self.collector,
                self.interval,
            )

    def _probe_loop(self) -> None:
        misses = 0
        while not self._stopped.is_set():
            if not self.probe_while_up:
                # Sleeps while the collector is up: exports are the health signal then.
                self._down.wait()
                if self._stopped.is_set():
                    return
            reachable = self._reachable()
            misses = 0 if reachable else misses + 1
            if not reachable and self.up and misses < DOWN_AFTER_MISSES:
                # One probe without an answer may be a slow one on a loaded host; asked again soon, since taking
                # tracing out (and putting it back) costs every proxy a listener update.
                self._stopped.wait(min(CONFIRM_SECONDS, self.interval))
                continue
            self.report(reachable)
            if not reachable or self.probe_while_up:
                self._stopped.wait(self.interval)

    def _reachable(self) -> bool:
        """Connect to the collector: READY is an answer, and so is TRANSIENT_FAILURE (refused, unreachable), so
        a collector that is down is known as fast as one that is up, not only at the timeout."""
        target = self.collector.target
        if self.collector.secure:
            credentials = self._credentials()
            if credentials is None:
                return False
            channel = grpc.secure_channel(target, credentials)
        else:
            channel = grpc.insecure_channel(target)
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

    def _credentials(self) -> grpc.ChannelCredentials | None:
        """The probe's TLS credentials; None when the CA file cannot be read."""
        try:
            return tls_credentials(self.collector)
        except OSError as exc:
            # Removed since start-up: the collector counts as not answering, said (rate-limited) like any failure.
            log.warning("tracing: the collector's CA file cannot be read: %s", exc)
            return None


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
