"""An asyncio event loop on a thread of its own, for benchmarks whose main thread blocks on load generators.

What runs on it (an OTLP receiver, a replica's lease keep-alive) must keep running while h2load or wrk does, so it
cannot share the main thread's blocking calls.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    """A running event loop on a daemon thread; ``run`` waits for a coroutine on it, ``stop`` ends both."""

    def __init__(self, name: str = "asyncio") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the loop and return its result (its exception is raised here)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def stop(self) -> None:
        """Stop the loop, wait for its thread and close it (callbacks still scheduled are dropped)."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()
