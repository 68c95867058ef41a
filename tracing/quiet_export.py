"""Keeps a collector that is down from flooding the log.

With no collector listening, the OTLP exporter logs a warning for every retry of every batch and an error when it
gives up (a handful of lines every few seconds, for as long as the process runs), and the batch processor logs a
warning for every span it drops once its queue is full. The first of these is useful, the thousandth is noise.
The same holds for spans or attributes the encoders leave out (tracing.encoding's and, for the spans it hands on,
the SDK's, which logs a traceback per attribute): a client that sends a bad value sends it again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

#: Loggers of the export path: the OTLP gRPC exporter (export thread) and the batch processor.
EXPORTER_LOGGER = "opentelemetry.exporter.otlp.proto.grpc.exporter"
PROCESSOR_LOGGER = "opentelemetry.sdk._shared_internal"
#: Loggers of the span encoders (export thread): ours, and the SDK's attribute encoder.
ENCODER_LOGGERS = ("tracing.encoding", "opentelemetry.exporter.otlp.proto.common._internal")
#: One export problem per this many seconds reaches the log.
DEFAULT_INTERVAL_SECONDS = 60.0


class RateLimitFilter(logging.Filter):
    """Passes the first record, then at most one per ``interval`` seconds; the next one that passes says how many
    were held back. Records below ``min_level`` always pass. Thread-safe (the exporter logs from its own thread)."""

    def __init__(
        self,
        interval: float = DEFAULT_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        min_level: int = logging.NOTSET,
    ) -> None:
        super().__init__()
        self.interval = interval
        self.min_level = min_level
        self._clock = clock
        self._lock = threading.Lock()
        self._next_allowed = float("-inf")
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether ``record`` is logged (it may get a note of the records suppressed before it)."""
        if record.levelno < self.min_level:
            return True
        now = self._clock()
        with self._lock:
            if now < self._next_allowed:
                self.suppressed += 1
                return False
            held_back, self.suppressed = self.suppressed, 0
            self._next_allowed = now + self.interval
        if held_back:
            record.msg = f"{record.msg} ({held_back} similar tracing export messages suppressed)"
        else:
            record.msg = f"{record.msg} (tracing export messages are limited to one per {self.interval:g} s)"
        # The exporter's tracebacks for a refused connection say nothing the message does not.
        record.exc_info = None
        record.exc_text = None
        return True


_installed: RateLimitFilter | None = None


def quiet_export_logging(interval: float = DEFAULT_INTERVAL_SECONDS) -> RateLimitFilter:
    """Rate-limit the exporter's messages and the encoders' (each their own budget) and silence the processor's
    per-span drop warnings (idempotent); returns the exporter's filter.

    The drop warning is raised to ERROR level rather than filtered because it is logged on the request path, once
    per span, where a filtered record is still built; an export failure is already in the log when spans drop.
    """
    global _installed
    if _installed is None:
        _installed = RateLimitFilter(interval)
        logging.getLogger(EXPORTER_LOGGER).addFilter(_installed)
        logging.getLogger(PROCESSOR_LOGGER).setLevel(logging.ERROR)
        # A budget of their own: a collector that is down must not hide that spans are left out, nor the reverse.
        encoders = RateLimitFilter(interval)
        for name in ENCODER_LOGGERS:
            logging.getLogger(name).addFilter(encoders)
    return _installed
