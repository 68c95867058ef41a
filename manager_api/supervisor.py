"""Keeps the children of `hydro up` running: a child that exits is started again, with back-off.

The back-off is the deployer's (deployer/backoff.py): 0.5 s doubling to 30 s with each exit in a row, and a child
that ran ``reset_after`` seconds (10 minutes by default) before it exited starts over from 0.5 s, so a few crashes
long ago do not leave it waiting the longest delay for good.

Not thread-safe except for ``stop``, which another thread (a signal handler's) may call while ``run`` loops.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from manager_api.deployer.backoff import BACKOFF_RESET_SECONDS, Backoff
from manager_api.processes import ChildProcess

log = logging.getLogger(__name__)


@dataclass
class _Child:
    process: ChildProcess
    backoff: Backoff
    #: When the current process was started (monotonic): how long it ran decides whether its exit resets the back-off.
    started_at: float = field(default_factory=time.monotonic)
    #: When its exit was noticed; 0 while it runs.
    down_since: float = 0.0


class Supervisor:
    """Restarts the processes in its books when they exit, until stopped."""

    def __init__(self, poll_interval: float = 0.2, reset_after: float = BACKOFF_RESET_SECONDS) -> None:
        self._children: list[_Child] = []
        self._poll_interval = poll_interval
        self._reset_after = reset_after
        self._stopping = False

    def add(self, process: ChildProcess) -> None:
        """Put ``process`` in the books, started or about to be: stop() stops it even if it never got ready."""
        self._children.append(_Child(process, Backoff(reset_after=self._reset_after)))

    @property
    def processes(self) -> list[ChildProcess]:
        """The current process of each child (a restart replaces it), in the order they were added."""
        return [child.process for child in self._children]

    def check(self) -> None:
        """One pass: note the children that exited, start again those whose back-off is over."""
        now = time.monotonic()
        for child in self._children:
            if child.process.running or self._stopping:
                child.down_since = 0.0
                continue
            if not child.down_since:
                child.down_since = now
                ran_for = now - child.started_at
                delay = child.backoff.failed(ran_for)
                log.warning(
                    "%s exited with %s after %.1f s; restarting in %.1f s",
                    *(child.process.name, child.process.returncode, ran_for, delay),
                )
            if now - child.down_since >= child.backoff.delay():
                child.down_since = 0.0
                old = child.process
                child.process = ChildProcess(old.name, old.argv, env=old.env, log_path=old.log_path).start()
                child.started_at = time.monotonic()

    def run(self) -> None:
        """Check the children until stop() is called."""
        while not self._stopping:
            self.check()
            time.sleep(self._poll_interval)

    def stop(self, grace: Callable[[ChildProcess], float] = lambda process: 10.0) -> None:
        """Stop restarting, then stop every child in reverse order, each given ``grace(process)`` seconds."""
        self._stopping = True
        for child in reversed(self._children):
            child.process.stop(grace=grace(child.process))
