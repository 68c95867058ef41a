"""Port picking: below the ephemeral range, free, and not handed out twice."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from manager_api import ports
from manager_api.ports import free_port


def _ephemeral_low() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


class _Scripted(random.Random):
    """Returns the scripted ports first, then random ones in the range asked for."""

    def __init__(self, first: list[int]) -> None:
        super().__init__(7)
        self.first = first

    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int:  # type: ignore[override]
        if self.first:
            return self.first.pop(0)
        return super().randrange(start, stop, step)


@pytest.fixture
def window(monkeypatch: pytest.MonkeyPatch) -> Iterator[range]:
    """A pick window of 1,000 ports and a fresh memory of handed-out ports."""
    if _ephemeral_low() < ports.PICK_LOW + 1000:
        pytest.skip("this machine's ephemeral range leaves no pick window")
    monkeypatch.setattr(ports, "PICK_HIGH", ports.PICK_LOW + 1000)
    monkeypatch.setattr(ports, "_handed_out", set())
    monkeypatch.setattr(ports, "_reserved", set(), raising=False)
    monkeypatch.delenv("HYDRO_RESERVED_PORTS", raising=False)
    yield range(ports.PICK_LOW, ports.PICK_LOW + 1000)


def _listening_in(window: range) -> socket.socket:
    for candidate in window:
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", candidate))
        except OSError:
            sock.close()
            continue
        sock.listen()
        return sock
    raise AssertionError("no port of the window could be bound")


def test_picks_come_from_below_the_ephemeral_range() -> None:
    high = min(ports.PICK_HIGH, _ephemeral_low())
    if high - ports.PICK_LOW < 1000:
        pytest.skip("this machine's ephemeral range leaves no pick window")
    picked = [free_port() for _ in range(50)]
    assert all(ports.PICK_LOW <= port < high for port in picked), picked


def test_a_listening_port_is_never_picked(window: range, monkeypatch: pytest.MonkeyPatch) -> None:
    with _listening_in(window) as taken:
        busy = taken.getsockname()[1]
        # The random choice offers the taken port first, twice: the bind check must refuse it both times.
        monkeypatch.setattr(ports, "_random", _Scripted([busy, busy]))
        port = free_port()
    assert port != busy and port in window


def test_no_port_is_handed_out_twice(window: range, monkeypatch: pytest.MonkeyPatch) -> None:
    with _listening_in(window) as probe:
        free = probe.getsockname()[1]
    # Offered the same free port three times: handed out once.
    monkeypatch.setattr(ports, "_random", _Scripted([free, free, free]))
    first, second = free_port(), free_port()
    assert first == free and second != first
    picked = [free_port() for _ in range(400)]
    assert len({*picked, first, second}) == 402


def test_a_reserved_port_is_never_picked(window: range, monkeypatch: pytest.MonkeyPatch) -> None:
    with _listening_in(window) as probe:
        given = probe.getsockname()[1]
    # A port a command line named, free until its server binds it: offered twice, picked never.
    ports.reserve(given)
    monkeypatch.setattr(ports, "_random", _Scripted([given, given]))
    assert given not in [free_port() for _ in range(400)]


def test_a_reserved_port_stays_reserved_once_the_picks_start_over(
    window: range, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _listening_in(window) as probe:
        given = probe.getsockname()[1]
    ports.reserve(given)
    # Half the window handed out: the memory of picks is forgotten so that picks never run dry (a crash-looping
    # replica picks new ports at each start). The port a command line named must still never be picked.
    picked = [free_port() for _ in range(len(window) // 2 + 1)]
    monkeypatch.setattr(ports, "_random", _Scripted([given, given]))
    picked += [free_port(), free_port()]
    assert given not in picked


def test_ports_named_in_the_environment_are_never_picked(window: range, monkeypatch: pytest.MonkeyPatch) -> None:
    with _listening_in(window) as probe:
        given = probe.getsockname()[1]
    # What `hydro up` tells its children (the manager's deployer): the stack's ports, bound later by their servers.
    monkeypatch.setenv("HYDRO_RESERVED_PORTS", f"{given},{given + 1}")
    monkeypatch.setattr(ports, "_random", _Scripted([given, given + 1, given]))
    assert not {given, given + 1} & {free_port() for _ in range(400)}


def test_an_unreadable_reserved_ports_variable_is_ignored_with_a_warning(
    window: range, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("HYDRO_RESERVED_PORTS", "25001,http,99999")
    assert free_port() in window
    assert "'http' is not a port number" in caplog.text and "'99999' is not a port number" in caplog.text


def test_ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    port = free_port("::1")
    assert ports.PICK_LOW <= port < ports.PICK_HIGH
    with socket.socket(socket.AF_INET6) as sock:
        sock.bind(("::1", port))


def test_a_host_that_does_not_resolve_is_an_error_at_once() -> None:
    with pytest.raises(OSError):
        free_port("no-such-host.invalid")


def test_a_machine_whose_ephemeral_range_leaves_no_room_gets_kernel_ports(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    narrow = tmp_path / "ip_local_port_range"
    narrow.write_text("20500\t60999\n")
    monkeypatch.setattr(ports, "_EPHEMERAL_RANGE", narrow)
    monkeypatch.setattr(ports, "_warned", False)
    port = free_port()
    # The kernel's own choice, from the machine's real ephemeral range.
    assert port >= _ephemeral_low()
    assert "ephemeral range (it starts at 20500" in caplog.text


def test_a_full_window_falls_back_to_the_kernel(window: range, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "_warned", False)
    with _listening_in(window) as taken:
        busy = taken.getsockname()[1]
        monkeypatch.setattr(ports, "_random", _Scripted([busy] * ports._ATTEMPTS))
        port = free_port()
    assert port not in window
