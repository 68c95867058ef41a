"""Network namespaces as hosts, for multi-host tests on one machine.

Every host is a namespace with one veth (``eth0``) plugged into a bridge that lives in a namespace of its own, so
nothing is added to the machine's own network: no address, no link, no route outside our namespaces. Processes
run on a host through ``ip netns exec``; the test itself reaches a host's addresses (its loopback included) by
calling functions in threads that entered the host's namespace (``setns`` is per thread on Linux).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_CLONE_NEWNET = 0x40000000


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def why_namespaces_are_unavailable(probe: str) -> str | None:
    """None if ``ip netns add`` works here, else the reason (not root, no ip command, no permission)."""
    try:
        _ip("netns", "add", probe)
    except (OSError, RuntimeError) as exc:
        return f"cannot create network namespaces here: {exc}"
    _ip("netns", "del", probe)
    return None


def _enter(namespace: str) -> None:
    # Runs first in each worker thread: from then on every socket that thread opens is in ``namespace``.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    fd = os.open(f"/var/run/netns/{namespace}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {namespace}")
    finally:
        os.close(fd)


class Host:
    """One namespace with one address on the shared bridge."""

    def __init__(self, namespace: str, address: str) -> None:
        self.namespace = namespace
        self.address = address
        self._threads = ThreadPoolExecutor(4, thread_name_prefix=namespace, initializer=_enter, initargs=(namespace,))

    def argv(self, command: Sequence[str]) -> list[str]:
        """``command`` run inside this host (``ip netns exec`` execs it: the pid is the command's own)."""
        return ["ip", "netns", "exec", self.namespace, *command]

    def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` in a thread inside this host's network and return its result (or raise its error)."""
        return self._threads.submit(fn, *args, **kwargs).result()

    def submit(self, fn: Callable[[], T]) -> Callable[[], T]:
        """Start ``fn`` inside this host; the returned function waits for its result."""
        return self._threads.submit(fn).result

    def pids(self) -> list[int]:
        """Every process whose network namespace is this host's."""
        return [int(pid) for pid in _ip("netns", "pids", self.namespace).split()]

    def kill_everything(self) -> list[int]:
        """SIGKILL every process on this host, as a power cut would; returns their pids."""
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def close(self) -> None:
        self._threads.shutdown(wait=True, cancel_futures=True)


class Network:
    """A bridge in its own namespace and hosts plugged into it, ``{subnet}.{octet}/24`` each."""

    def __init__(self, name: str, subnet: str = "10.77.0") -> None:
        self.name = name
        self.subnet = subnet
        self.hosts: dict[str, Host] = {}
        self._bridge = f"{name}-br"
        self._namespaces: list[str] = []
        self._add_namespace(self._bridge)
        _ip("-n", self._bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", self._bridge, "link", "set", "br0", "up")

    def _add_namespace(self, namespace: str) -> None:
        _ip("netns", "add", namespace)
        self._namespaces.append(namespace)
        _ip("-n", namespace, "link", "set", "lo", "up")

    def add_host(self, role: str, octet: int) -> Host:
        """A new host ``role`` at ``{subnet}.{octet}``, reachable from every other host of this network."""
        namespace = f"{self.name}-{role}"
        self._add_namespace(namespace)
        port = f"v-{role}"[:15]
        _ip("-n", self._bridge, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        _ip("-n", self._bridge, "link", "set", port, "master", "br0", "up")
        address = f"{self.subnet}.{octet}"
        _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        host = Host(namespace, address)
        self.hosts[role] = host
        return host

    def close(self) -> list[int]:
        """Kill what still runs on any host, then delete every namespace (their veths go with them).

        Returns the pids that had to be killed: the test's own teardown should have stopped them all.
        """
        leftovers: list[int] = []
        for host in self.hosts.values():
            host.close()
            leftovers += host.kill_everything()
        for namespace in reversed(self._namespaces):
            with contextlib.suppress(RuntimeError):
                _ip("netns", "del", namespace)
        return leftovers
