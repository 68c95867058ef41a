"""The in-process OTLP receiver, for tests that check what reaches a trace collector."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from otlp_receiver import OtlpReceiver


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    """An OTLP gRPC trace collector on a free loopback port; spans are cleared per test by the tests that care."""
    collector = OtlpReceiver().start()
    try:
        yield collector
    finally:
        collector.stop()
