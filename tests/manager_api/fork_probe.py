"""Start children with ChildProcess while etcd calls are in flight; print their exit codes as JSON.

    python tests/manager_api/fork_probe.py HOST PORT PREFIX CHILDREN

Run as its own process by test_fork_safety.py: like every entry point of ours it imports manager_api before gRPC
(aetcd), so it sees the gRPC settings the product's processes get.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from functools import partial
from typing import Any

from manager_api.processes import ChildProcess, wait_until


def _aetcd() -> Any:
    # Imported only once manager_api is: importing grpc first would bypass the setting under test.
    import aetcd

    return aetcd


async def _etcd_traffic(host: str, port: int, prefix: str, stop: threading.Event, started: threading.Event) -> None:
    async with _aetcd().Client(host=host, port=port) as client:
        key = f"{prefix}fork-probe".encode()
        while not stop.is_set():
            # Several calls at once, so that gRPC's threads are busy whenever the other thread forks.
            await asyncio.gather(*(client.put(key, b"x") for _ in range(4)), client.get(key))
            started.set()


def _exited(child: ChildProcess) -> bool:
    return not child.running


def main() -> None:
    """Spawn CHILDREN short-lived children (each /bin/true) one after another under etcd load."""
    host, port, prefix, children = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    stop, started = threading.Event(), threading.Event()
    traffic = threading.Thread(target=asyncio.run, args=(_etcd_traffic(host, port, prefix, stop, started),))
    traffic.start()
    codes: list[int | None] = []
    try:
        if not started.wait(30):
            sys.exit("no etcd call succeeded within 30 s")
        for index in range(children):
            child = ChildProcess(f"probe-{index}", ["/bin/true"]).start()
            try:
                # A child that hangs between fork and exec (a lock held across the fork) fails too.
                wait_until(partial(_exited, child), 10, f"child {index} to exit", interval=0.01)
            finally:
                child.stop(grace=1)
            codes.append(child.returncode)
    finally:
        stop.set()
        traffic.join(30)
    print(json.dumps({"exit_codes": codes}))


if __name__ == "__main__":
    main()
