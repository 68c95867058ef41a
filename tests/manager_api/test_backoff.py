"""The restart back-off shared by replicas, deployments that cannot start and `hydro up`'s children."""

from __future__ import annotations

from manager_api.deployer.backoff import BACKOFF_RESET_SECONDS, Backoff


def test_failures_in_a_row_wait_half_a_second_doubling_to_the_cap() -> None:
    backoff = Backoff()
    assert backoff.delay() == 0.0
    assert [backoff.failed(ran_for=1.0) for _ in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert Backoff(cap=3.0).failed() == 0.5
    short = Backoff(cap=3.0)
    assert [short.failed() for _ in range(4)] == [0.5, 1.0, 2.0, 3.0]


def test_a_failure_after_a_long_enough_run_or_a_reset_waits_the_shortest_delay_again() -> None:
    backoff = Backoff()
    for _ in range(5):
        backoff.failed()
    assert backoff.failed(ran_for=BACKOFF_RESET_SECONDS) == 0.5
    assert backoff.failed(ran_for=1.0) == 1.0
    backoff.reset()
    assert backoff.failed() == 0.5
    assert Backoff(reset_after=2.0).failed(ran_for=2.5) == 0.5
