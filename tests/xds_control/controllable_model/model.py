"""A python-runtime model that fails or slows down on demand, for tests of the mesh's traffic policies.

Each call reads the file ``mode`` beside this module (absent means ``ok``), so a test can change one replica's
behaviour while it runs by giving each replica its own copy of this folder:

- ``ok``: answer ``y = x``
- ``fail``: raise on every call (HTTP 500 / gRPC INTERNAL)
- ``fail-half``: raise on every other call
- ``slow:<ms>``: sleep that long, then answer

Independently of the mode, an input with ``x == -1`` always raises.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

MODE_FILE = Path(__file__).with_name("mode")


class Controllable:
    """The model object the python runtime loads (entrypoint ``model:Controllable``)."""

    def load(self) -> None:
        """Reset the call counter that ``fail-half`` alternates on."""
        self.calls = 0
        self.lock = threading.Lock()

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Echo ``x`` as ``y``, unless the mode file or the input says to fail or to be slow."""
        x = inputs["x"]
        with self.lock:
            # predict runs on several worker threads: the alternation must count every call exactly once.
            self.calls += 1
            call = self.calls
        if (x == -1).any():
            raise ValueError("asked to fail: x == -1")
        mode = MODE_FILE.read_text().strip() if MODE_FILE.exists() else "ok"
        if mode == "fail":
            raise RuntimeError("this replica is told to fail (mode: fail)")
        if mode == "fail-half" and call % 2 == 0:
            raise RuntimeError("this replica is told to fail every other call (mode: fail-half)")
        if mode.startswith("slow:"):
            time.sleep(int(mode.split(":", 1)[1]) / 1000)
        return {"y": x}
