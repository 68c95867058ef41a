"""Picking TCP ports for the processes we start (runtimes, sidecars, etcd, the stack's servers, tests' servers).

A port is chosen here and bound later by another process, so it can be taken in between. Asking the kernel for
one (binding port 0) hands out a port of the ephemeral range, the same range every outgoing connection on the
machine takes its local port from: under load (a test suite, a busy node) a connection could take the port before
the child bound it, and the child failed with "Address already in use". So ports come from below the ephemeral
range, which connections never use, at random, checked free by binding them, and never handed out twice by one
process while there are others left.
"""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

#: Where picks come from: below the kernel's ephemeral range (32768-60999 by default), above the well-known and
#: registered ports most services use (etcd 2379, Jaeger 4317/16686, ...).
PICK_LOW, PICK_HIGH = 20000, 30000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")

_lock = threading.Lock()
_handed_out: set[int] = set()
_random = random.SystemRandom()


def _ephemeral_low() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As the servers we start bind: a port whose last connection is in TIME_WAIT is usable.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _kernel_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` a moment ago, outside the ephemeral range (see the module's docstring).

    Falls back to a kernel-chosen port when the machine's ephemeral range leaves no room below it.
    """
    high = min(PICK_HIGH, _ephemeral_low())
    if high - PICK_LOW < 1000:
        return _kernel_port(host)
    with _lock:
        if len(_handed_out) > (high - PICK_LOW) // 2:
            _handed_out.clear()
        for _ in range(200):
            port = _random.randrange(PICK_LOW, high)
            if port not in _handed_out and _bindable(host, port):
                _handed_out.add(port)
                return port
    return _kernel_port(host)
