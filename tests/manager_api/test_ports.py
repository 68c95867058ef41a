"""Port picking: below the ephemeral range, free, and not handed out twice."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from manager_api import ports
from manager_api.ports import free_port


def _ephemeral_range() -> tuple[int, int]:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(low), int(high)


def test_picks_are_below_the_ephemeral_range_and_bindable() -> None:
    low, _ = _ephemeral_range()
    picked = [free_port() for _ in range(50)]
    assert all(ports.PICK_LOW <= port < min(ports.PICK_HIGH, low) for port in picked), picked
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", picked[-1]))


def test_a_listening_port_is_skipped_and_none_is_handed_out_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    # A window of 1,000 ports, one of them taken: 400 picks never return it nor repeat one.
    monkeypatch.setattr(ports, "PICK_HIGH", ports.PICK_LOW + 1000)
    monkeypatch.setattr(ports, "_handed_out", set())
    with socket.socket() as taken:
        for candidate in range(ports.PICK_LOW, ports.PICK_LOW + 1000):
            try:
                taken.bind(("127.0.0.1", candidate))
                break
            except OSError:
                continue
        taken.listen()
        busy = taken.getsockname()[1]
        picked = [free_port() for _ in range(400)]
    assert busy not in picked
    assert len(set(picked)) == len(picked)
    assert all(ports.PICK_LOW <= port < ports.PICK_LOW + 1000 for port in picked)


def test_ipv6_loopback() -> None:
    port = free_port("::1")
    with socket.socket(socket.AF_INET6) as sock:
        sock.bind(("::1", port))


def test_a_machine_whose_ephemeral_range_leaves_no_room_gets_kernel_ports(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    narrow = tmp_path / "ip_local_port_range"
    narrow.write_text("20500\t60999\n")
    monkeypatch.setattr(ports, "_EPHEMERAL_RANGE", narrow)
    port = free_port()
    # The kernel's own choice, from the machine's real ephemeral range.
    assert port >= _ephemeral_range()[0]
