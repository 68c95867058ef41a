"""Spawn children as the pipeline runtime spawns its shadow worker, while gRPC is busy; print their exit codes.

    python tests/runtimes/shadow_spawn_probe.py CHILDREN [--grpc-first]

Run as its own process by test_shadow_spawn.py. Like ``python -m runtimes.pipeline`` it imports the
runtimes.pipeline package before gRPC, so it gets the gRPC settings the pipeline runtime gets; ``--grpc-first``
imports gRPC before it instead (what the runtime did before the package chose them).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
from types import ModuleType


async def _traffic(grpc: ModuleType, started: asyncio.Event) -> None:
    """Calls to an in-process gRPC server, several at once, so that gRPC's threads are busy at every fork."""
    aio = grpc.aio
    server = aio.server()

    async def echo(request: bytes, context: object) -> bytes:
        return request

    handler = grpc.unary_unary_rpc_method_handler(echo)
    generic = grpc.method_handlers_generic_handler("probe.Echo", {"Echo": handler})
    server.add_generic_rpc_handlers((generic,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/probe.Echo/Echo")
            while True:
                await asyncio.gather(*(call(b"x" * 1024) for _ in range(8)))
                started.set()
    finally:
        await server.stop(0)


async def _spawn(children: int, grpc: ModuleType) -> list[int]:
    started = asyncio.Event()
    traffic = asyncio.create_task(_traffic(grpc, started))
    try:
        await asyncio.wait_for(started.wait(), 30)
        codes = []
        for _ in range(children):
            # As runtimes.pipeline.shadows starts its worker.
            child = await asyncio.create_subprocess_exec("/bin/true")
            codes.append(await asyncio.wait_for(child.wait(), 10))
        return codes
    finally:
        traffic.cancel()
        await asyncio.gather(traffic, return_exceptions=True)


def main() -> None:
    """Spawn CHILDREN children (each /bin/true) one after another under gRPC load, on uvloop as the runtime runs."""
    children = int(sys.argv[1])
    if "--grpc-first" in sys.argv[2:]:
        importlib.import_module("grpc")
    importlib.import_module("runtimes.pipeline")
    grpc = importlib.import_module("grpc")
    import uvloop

    codes = uvloop.run(_spawn(children, grpc))
    print(json.dumps({"exit_codes": codes}))


if __name__ == "__main__":
    main()
