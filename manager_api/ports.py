"""Picking TCP ports for the processes we start (runtimes, sidecars, etcd, the stack's servers, tests' servers).

A port is chosen here and bound later by another process, so it can be taken in between. Asking the kernel for
one (binding port 0) hands out a port of the ephemeral range, the same range every outgoing connection on the
machine takes its local port from: under load (a test suite, a busy node) a connection could take the port before
the child bound it, and the child failed with "Address already in use". So ports come from below the ephemeral
range, which connections never use, at random, checked free by binding them, and never handed out twice by one
process while there are others left. Two processes picking at once are not coordinated: each checks that the port
is free, which a port picked by the other but not yet bound still is (a 1 in 10,000 chance per pair of picks).

Ports a process was told to use, which their servers may bind only later, are never picked: those given to
``reserve`` in this process, and those named in ``$HYDRO_RESERVED_PORTS`` (comma-separated), which `hydro up` sets
for its children so that the manager's deployer never picks the ingress's port, bound only when its listener
arrives over LDS, or any other port of the stack's.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import random
import socket
import threading
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

#: Where picks come from: below the kernel's ephemeral range (32768-60999 by default), above the well-known and
#: registered ports most services use (etcd 2379, Jaeger 4317/16686, ...).
PICK_LOW, PICK_HIGH = 20000, 30000
#: Fewer ports than this below the ephemeral range: picks come from the kernel, as before.
_MIN_WINDOW = 1000
_ATTEMPTS = 200
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
#: Ports never to pick, comma-separated: set by `hydro up` for its children (stack.py), settable for an agent.
RESERVED_PORTS_ENV = "HYDRO_RESERVED_PORTS"

_lock = threading.Lock()
#: Picked by this process; forgotten when half the window was handed out, so picks never run dry.
_handed_out: set[int] = set()
#: Given to reserve(): never forgotten, since their servers may bind them at any time (an ingress restarted).
_reserved: set[int] = set()
_random = random.SystemRandom()
_warned = False


def _ephemeral_low() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _address(host: str) -> tuple[socket.AddressFamily, tuple[object, ...]]:
    """The family and socket address ``host`` resolves to first, as the servers we start bind it."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    return family, sockaddr


def _bindable(family: socket.AddressFamily, sockaddr: tuple[object, ...], port: int) -> bool:
    # No SO_REUSEADDR: a port in TIME_WAIT, or bound by a server that does not listen yet, counts as taken.
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((sockaddr[0], port, *sockaddr[2:]))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def _kernel_port(family: socket.AddressFamily, sockaddr: tuple[object, ...], why: str) -> int:
    global _warned
    if not _warned:
        _warned = True
        log.warning(
            "ports come from the kernel's ephemeral range (%s): an outgoing connection may take one before its "
            "server binds it",
            why,
        )
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((sockaddr[0], 0, *sockaddr[2:]))
        return int(sock.getsockname()[1])


def reserve(*given: int) -> None:
    """Never pick these ports in this process: ports it was told to use (a command line's), which their servers may
    bind only later (an Envoy listener comes with its first LDS) and so still look free."""
    with _lock:
        _reserved.update(given)


def reserved_environment(env: dict[str, str], given: Iterable[int]) -> None:
    """Add ``given`` to the reserved ports ``env`` passes to a child process (``$HYDRO_RESERVED_PORTS``), keeping
    those already there: the child, and any process it starts with that environment, never picks them."""
    ports = sorted({*parse_reserved(env.get(RESERVED_PORTS_ENV, "")), *(port for port in given if port)})
    env[RESERVED_PORTS_ENV] = ",".join(str(port) for port in ports)


@functools.lru_cache(maxsize=4)
def parse_reserved(value: str) -> frozenset[int]:
    """The ports of a ``$HYDRO_RESERVED_PORTS`` value; what is not a port number is ignored with a warning."""
    ports = set()
    for item in value.replace(" ", ",").split(","):
        if not item:
            continue
        if item.isdigit() and 0 < int(item) < 65536:
            ports.add(int(item))
        else:
            log.warning("%s: %r is not a port number; ignored", RESERVED_PORTS_ENV, item)
    return frozenset(ports)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` a moment ago, from 20000-29999 (see the module's docstring).

    Falls back to a port the kernel picks when the machine's ephemeral range leaves fewer than 1,000 ports below it,
    or when 200 random picks were all taken (a warning says so once).
    """
    family, sockaddr = _address(host)
    high = min(PICK_HIGH, _ephemeral_low())
    if high - PICK_LOW < _MIN_WINDOW:
        return _kernel_port(family, sockaddr, f"it starts at {high}, leaving too few ports below it")
    # Read at each pick, not at import: cheap (parsed once per distinct value), and right after a change.
    from_env = parse_reserved(os.environ.get(RESERVED_PORTS_ENV, ""))
    with _lock:
        if len(_handed_out) > (high - PICK_LOW) // 2:
            _handed_out.clear()
        for _ in range(_ATTEMPTS):
            port = _random.randrange(PICK_LOW, high)
            taken = port in _handed_out or port in _reserved or port in from_env
            if not taken and _bindable(family, sockaddr, port):
                _handed_out.add(port)
                return port
    return _kernel_port(family, sockaddr, f"{_ATTEMPTS} random picks in {PICK_LOW}-{high - 1} were all taken")
