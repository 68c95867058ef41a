"""`hydro up`'s supervisor with a real child that the test makes crash: crashes in a row back off, and a crash after
the child ran long enough starts from the shortest delay again.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from manager_api.processes import ChildProcess, wait_until
from manager_api.supervisor import Supervisor

#: A child that notes when it starts and when it crashes, and crashes (exit 3) as soon as the crash file exists.
CRASHER = """
import os, sys, time
crash, events = sys.argv[1], sys.argv[2]
with open(events, "a") as out:
    out.write(f"start {time.monotonic()}\\n")
while not os.path.exists(crash):
    time.sleep(0.02)
with open(events, "a") as out:
    out.write(f"crash {time.monotonic()}\\n")
sys.exit(3)
"""

#: The reset window the test gives the supervisor (`hydro up`'s is BACKOFF_RESET_SECONDS, 10 minutes).
RESET_AFTER = 2.0


@dataclass
class Crasher:
    crash_file: Path
    events_file: Path

    def times(self, kind: str) -> list[float]:
        """When the child started (``start``) or crashed (``crash``), every time so far (CLOCK_MONOTONIC, which every
        process shares)."""
        if not self.events_file.exists():
            return []
        lines = [line.split() for line in self.events_file.read_text().splitlines()]
        return [float(at) for what, at in lines if what == kind]


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[Crasher]:
    """The crasher under a Supervisor running in a thread; both stopped at the end."""
    crasher = Crasher(tmp_path / "crash-now", tmp_path / "events")
    argv = [sys.executable, "-c", CRASHER, str(crasher.crash_file), str(crasher.events_file)]
    supervisor = Supervisor(reset_after=RESET_AFTER)
    supervisor.add(ChildProcess("crasher", argv, log_path=tmp_path / "crasher.log").start())
    loop = threading.Thread(target=supervisor.run, name="supervisor")
    loop.start()
    try:
        yield crasher
    finally:
        supervisor.stop(grace=lambda process: 5.0)
        loop.join(10)


def test_crashes_in_a_row_back_off_and_a_long_run_resets_the_back_off(supervised: Crasher) -> None:
    crasher = supervised
    wait_until(lambda: len(crasher.times("start")) == 1, 10, "the child's first start")
    # Four crashes in a row, each right after its start: the waits grow 0.5 s, 1 s, 2 s, then 4 s.
    crasher.crash_file.touch()
    wait_until(lambda: len(crasher.times("crash")) == 4, 30, "four crashes in a row")
    crasher.crash_file.unlink()
    wait_until(lambda: len(crasher.times("start")) == 5, 30, "the start after the fourth crash")
    starts, crashes = crasher.times("start"), crasher.times("crash")
    waits = [start - crash for crash, start in zip(crashes, starts[1:], strict=True)]
    assert waits[-1] >= 3.5 and waits[-1] > 4 * waits[0], waits
    # It runs longer than the reset window (this wait is the run being tested, not a readiness wait), then crashes:
    # the next start comes after the shortest delay, not after the fifth step of the old streak (8 s).
    time.sleep(max(0.0, crasher.times("start")[-1] + RESET_AFTER + 0.5 - time.monotonic()))
    crasher.crash_file.touch()
    wait_until(lambda: len(crasher.times("start")) == 6, 30, "the start after the crash that followed a long run")
    crashed, restarted = crasher.times("crash")[4], crasher.times("start")[5]
    assert restarted - crashed < 2.0, restarted - crashed
