"""CollectorWatch's transitions: what pauses tracing and what does not, in what order the owner hears of them,
and a probe that keeps watching a collector that is up (against a real receiver)."""

from __future__ import annotations

import threading
import time

from otlp_receiver import OtlpReceiver

from manager_api.processes import wait_until
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


def test_a_failed_export_that_began_right_after_the_collector_came_back_does_not_pause_tracing() -> None:
    # The exporter's channel may still be in its reconnect back-off (up to a probe interval) when the probe's fresh
    # connection finds the collector back: its export fails without trying. Seen in a full run as tracing pausing
    # and resuming again within 0.3 s of coming back.
    watch, changes = watch_with_log()
    watch.report(True)
    watch.report(False, started_at=time.monotonic())
    assert (watch.up, changes) == (True, [True])


def test_a_failed_export_that_began_a_probe_interval_after_the_collector_came_back_pauses_tracing() -> None:
    watch, changes = watch_with_log()
    watch.report(True)
    # An export start a probe interval later (given as its time, not waited for).
    watch.report(False, started_at=time.monotonic() + watch.interval)
    assert (watch.up, changes) == (False, [True, False])
    # Repeated news changes nothing.
    watch.report(False, started_at=time.monotonic() + watch.interval)
    assert changes == [True, False]


def test_a_transition_is_delivered_only_after_the_one_before_it() -> None:
    """An export thread that found the collector down and is held up delivering it must not have its news
    arrive after the probe's newer "up": the owner would be left paused while the watch says up (and, the
    collector being up, nothing would probe again)."""
    delivered: list[bool] = []
    inside = threading.Event()
    release = threading.Event()

    def slow_owner(reachable: bool) -> None:
        if not reachable:
            inside.set()
            release.wait(10)
        delivered.append(reachable)

    watch = CollectorWatch(CollectorAddress("127.0.0.1", 9), slow_owner)
    watch.report(True)
    # An export that began a probe interval after the collector was seen up (given as its time, not waited for).
    export = threading.Thread(target=watch.report, args=(False, time.monotonic() + watch.interval))
    probe = threading.Thread(target=watch.report, args=(True,))
    try:
        export.start()
        assert inside.wait(10), "the export's news never reached the owner"
        probe.start()
        probe.join(0.5)
        assert probe.is_alive(), "the probe's 'up' went through while the 'down' before it was being delivered"
    finally:
        release.set()
        export.join(10)
        probe.join(10)
    assert (watch.up, delivered) == (True, [True, False, True]), "the last news delivered is the current state"


def test_probing_while_up_notices_the_collector_going_away_and_coming_back() -> None:
    """For xds_control, whose own exports say nothing about the collector the Envoys send to."""
    changes: list[bool] = []
    receiver = OtlpReceiver().start()
    port = receiver.port
    watch = CollectorWatch(CollectorAddress("127.0.0.1", port), changes.append, interval=0.2, probe_while_up=True)
    watch.start()
    again: OtlpReceiver | None = None
    try:
        wait_until(lambda: watch.up, 10, "the probe to find the collector")
        receiver.stop()
        wait_until(lambda: watch.probed and not watch.up, 10, "the probe to find the collector gone")
        again = OtlpReceiver().start(port)
        wait_until(lambda: watch.up, 10, "the probe to find the collector back")
    finally:
        watch.stop()
        receiver.stop()
        if again is not None:
            again.stop()
    assert changes == [True, False, True]
