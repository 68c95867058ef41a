"""Child processes that never outlive their parent, and readiness polling with deadlines.

Used by `hydro up` (etcd, xds_control, manager_api, ingress Envoy), by the process deployer (runtimes and
sidecars) and by the tests. Every child runs in its own process group, so stopping it also stops anything it
started, and gets SIGTERM from the kernel if its parent dies (PR_SET_PDEATHSIG), so a SIGKILLed supervisor
leaves no orphans.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

import httpx

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child between fork and exec.
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class ReadinessTimeout(RuntimeError):
    """A process did not become ready before its deadline."""


class ProcessExited(ReadinessTimeout):
    """The process being waited for exited: waiting longer cannot help."""


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``check`` until it returns True; raise ReadinessTimeout naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except ProcessExited:
            raise
        except Exception as exc:  # a refused connection is the normal "not yet"
            last_error = exc
        time.sleep(interval)
    detail = f" (last error: {last_error})" if last_error else ""
    raise ReadinessTimeout(f"{what} not ready after {timeout:.0f} s{detail}")


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """Whether GET ``url`` answers 2xx."""
    return httpx.get(url, timeout=timeout).is_success


class ChildProcess:
    """One supervised child: its own process group, killed with its parent, logs to a file or inherited."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> ChildProcess:
        """Start the process (once)."""
        if self._proc is not None:
            raise RuntimeError(f"{self.name} already started")
        out: IO[bytes] | None = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = out = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        return self

    def wait_ready(self, check: Callable[[], bool], timeout: float = 30.0) -> None:
        """Poll ``check`` until true; fail early, with the log tail, if the process exits meanwhile."""

        def ready() -> bool:
            if not self.running:
                raise ProcessExited(f"{self.name} exited with {self.returncode}{self.log_tail()}")
            return check()

        try:
            wait_until(ready, timeout, self.name)
        except ProcessExited:
            raise
        except ReadinessTimeout as exc:
            if not self.running:
                raise ReadinessTimeout(f"{self.name} exited with {self.returncode}{self.log_tail()}") from exc
            raise ReadinessTimeout(f"{exc}{self.log_tail()}") from exc

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "\n--- " + self.name + " log ---\n" + "\n".join(tail)

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the whole process group (the child and whatever it started)."""
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the group, wait up to ``grace`` s, then SIGKILL it. Safe to call twice."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            self.signal_group(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                proc.wait(timeout=10)
        # Children of the child may still be alive if the child exited first.
        self.signal_group(signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None
        return proc.returncode
