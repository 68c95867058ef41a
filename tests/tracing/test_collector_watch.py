"""CollectorWatch's transitions: what pauses tracing and what does not (the probe thread is not started here)."""

from __future__ import annotations

import time

from tracing.collector_watch import CollectorWatch
from tracing.settings import CollectorAddress


def watch_with_log() -> tuple[CollectorWatch, list[bool]]:
    changes: list[bool] = []
    return CollectorWatch(CollectorAddress("127.0.0.1", 9), changes.append), changes


def test_a_failed_export_that_began_before_the_collector_came_back_does_not_pause_tracing() -> None:
    watch, changes = watch_with_log()
    began_during_outage = time.monotonic()
    watch.report(False)
    watch.report(True)  # the probe: the collector answers again
    # The export that was retrying through the outage gives up only now: stale news.
    watch.report(False, started_at=began_during_outage)
    assert (watch.up, changes) == (True, [False, True])


def test_a_failed_export_that_began_after_the_collector_came_back_pauses_tracing() -> None:
    watch, changes = watch_with_log()
    watch.report(True)
    watch.report(False, started_at=time.monotonic())
    assert (watch.up, changes) == (False, [True, False])
    # Repeated news changes nothing.
    watch.report(False, started_at=time.monotonic())
    assert changes == [True, False]
