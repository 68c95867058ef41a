"""`hydro up` that cannot start: one error line saying why, exit status 1, and no process left behind; and
`hydro up` stopped by Ctrl-C, as a terminal sends it.

Real etcd, xds_control and manager processes; the failure is real too (a port already taken, a deadline too short).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from manager_api.ports import free_port
from manager_api.processes import ReadinessTimeout, wait_until
from manager_api.stack import Stack, StackConfig

#: Every port of the stack picked free, so that the test never meets another engineer's `hydro up`.
FREE_PORTS = ("--ingress-port", "0", "--xds-port", "0", "--xds-metrics-port", "0", "--etcd-port", "0")


def _pids(where: Callable[[Path], bool]) -> list[int]:
    """The pids of processes whose /proc folder passes ``where`` (a process gone meanwhile does not)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and where(entry):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def live_children(parent: int) -> set[int]:
    """The pids of ``parent``'s direct children that are not zombies."""

    def child(entry: Path) -> bool:
        fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[1]) == parent and fields[0] != "Z"

    return set(_pids(child))


def carrying(marker: str) -> list[int]:
    """The pids of live processes whose environment holds ``HYDRO_UP_TEST=marker``."""
    wanted = f"HYDRO_UP_TEST={marker}".encode()
    return _pids(lambda entry: wanted in (entry / "environ").read_bytes().split(b"\0"))


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port something else already listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", free_port()))
        holder.listen()
        yield holder.getsockname()[1]


def test_hydro_up_on_a_taken_api_port_says_why_in_one_error(taken_port: int, tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    argv = [sys.executable, "-m", "manager_api.cli", "up", "--data-dir", str(tmp_path), *FREE_PORTS]
    argv += ["--api-port", str(taken_port)]
    env = {**os.environ, "HYDRO_UP_TEST": marker, "COLUMNS": "200"}
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    finally:
        # Whatever happened, nothing the stack started may outlive it.
        left = carrying(marker)
        for pid in left:
            os.kill(pid, 9)
    assert left == [], "processes of the stack left running"
    said = done.stdout + done.stderr
    assert done.returncode == 1, said
    assert "Traceback" not in said and "╭" not in said, said
    assert "error: manager_api exited with 3" in said, said
    # The reason, from the manager's log, is in the message.
    assert f"('127.0.0.1', {taken_port}): address already in use" in said, said


def test_a_child_that_never_gets_ready_is_stopped_with_the_others(tmp_path: Path) -> None:
    before = live_children(os.getpid())
    # No child answers ready within 50 ms: the first one started times out while it runs.
    config = StackConfig(data_dir=tmp_path, ready_timeout=0.05, ingress_port=0, api_port=0, xds_port=0)
    stack = Stack(StackConfig(**{**config.__dict__, "xds_metrics_port": 0, "etcd_port": 0}))
    try:
        with pytest.raises(ReadinessTimeout):
            stack.start()
    finally:
        stack.stop()
        left = live_children(os.getpid()) - before
        for pid in left:  # on failure: the session goes on without them
            os.kill(pid, 9)
    assert left == set(), "a child that did not get ready in time was left running"


def test_ctrl_c_stops_everything_and_says_so(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    argv = [sys.executable, "-m", "manager_api.cli", "up", "--data-dir", str(tmp_path), *FREE_PORTS]
    argv += ["--api-port", "0"]
    env = {**os.environ, "HYDRO_UP_TEST": marker, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "hydro-up.log"
    with log.open("w") as out:
        # A session of its own: its process group is what a terminal signals on Ctrl-C.
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: "Press Ctrl-C" in log.read_text() or process.poll() is not None, 120, "hydro up started")
        assert process.poll() is None, log.read_text()
        os.killpg(process.pid, signal.SIGINT)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        left = carrying(marker)
        for pid in left:
            os.kill(pid, 9)
    said = log.read_text()
    assert left == [], f"processes of the stack left running\n{said}"
    assert code == 0, said
    # Stopping takes seconds: the user who pressed Ctrl-C is told it was heard, then that it is done.
    ready = said.index("Press Ctrl-C to stop everything.")
    assert said.index("Stopping everything hydro up started...") > ready, said
    assert said.rstrip().endswith("Stopped."), said
