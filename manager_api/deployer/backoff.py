"""Restart back-off shared by everything that starts a thing again after it failed.

Replicas (replica.py), deployments that cannot start (process.py) and the children of `hydro up` (stack.py) all
wait 0.5 s doubling to 30 s between attempts, and forget a run of failures once the thing ran well long enough.
"""

from __future__ import annotations

from dataclasses import dataclass

#: A thing that ran this long before it failed starts again after the shortest delay, as the kubelet resets a
#: container's back-off after 10 minutes of running: otherwise one that failed six times, weeks apart, would wait
#: the longest delay for good.
BACKOFF_RESET_SECONDS = 600.0

#: The longest wait between two attempts.
MAX_BACKOFF_SECONDS = 30.0


def backoff_delay(restarts_in_a_row: int, cap: float = MAX_BACKOFF_SECONDS) -> float:
    """Seconds before the next start after ``restarts_in_a_row`` restarts: 0.5 s doubling to ``cap``."""
    return float(min(cap, 0.5 * 2 ** min(restarts_in_a_row, 16)))


@dataclass
class Backoff:
    """The back-off of one thing: how long to wait after its latest failure. Not thread-safe; one owner drives it.

    ``failed`` is called once per failure with how long the thing ran (or stayed ready) before it; a run of at
    least ``reset_after`` seconds ends the streak, so that failure waits the shortest delay again.
    """

    reset_after: float = BACKOFF_RESET_SECONDS
    cap: float = MAX_BACKOFF_SECONDS
    #: Failures since the thing last ran for ``reset_after`` seconds (or since ``reset``).
    streak: int = 0

    def failed(self, ran_for: float = 0.0) -> float:
        """Count a failure after ``ran_for`` seconds of running; the delay before the next attempt."""
        if ran_for >= self.reset_after:
            self.streak = 0
        self.streak += 1
        return self.delay()

    def delay(self) -> float:
        """Seconds to wait after the latest failure (0 before any)."""
        return backoff_delay(self.streak - 1, self.cap) if self.streak else 0.0

    def reset(self) -> None:
        """Forget the streak: the thing started, or what it is asked to run changed."""
        self.streak = 0
