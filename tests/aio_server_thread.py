"""A grpc.aio server on an event loop of its own thread: gRPC served from the test process (an OTLP receiver,
a stand-in for a pipeline's outbound listener) while the test's own code stays synchronous."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import grpc


class AioServerThread:
    """Starts and stops one grpc.aio server on a private loop thread."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._server: grpc.aio.Server | None = None

    def start(self, bind: Callable[[grpc.aio.Server], int]) -> int:
        """Start the server; ``bind`` adds its servicers and its port, and returns the port bound."""

        async def serve() -> int:
            # No SO_REUSEPORT: a port still held by another process must fail the bind, not be shared.
            self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            port = bind(self._server)
            await self._server.start()
            return int(port)

        self._thread.start()
        return asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)

    def stop(self) -> None:
        """Stop the server (0.5 s grace) and the loop; a server never started is left as it is."""
        if not self._thread.is_alive():
            return
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(0.5), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
