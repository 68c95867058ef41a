"""Stage 1 of the test pipeline: millimetres to centimetres (``input = raw / 10``), and its shadows.

The file ``mode`` beside this module (absent: ``ok``) makes a copy of the folder behave as a shadow variant:

- ``fail``: raise on every call
- ``sleep``: answer correctly after 2 s
- ``skew``: answer correctly except on every 4th call (off by one), so it agrees on exactly 3 calls in 4

Whatever the mode, negative input raises and a first length of 9999 takes 2 s (stage failures and slow stages
that the tests provoke on purpose).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

MODE_FILE = Path(__file__).with_name("mode")
SLOW_MARKER = 9999


class Scale:
    """The model object the python runtime loads (entrypoint ``model:Scale``)."""

    def load(self) -> None:
        """Read the mode once; reset the call counter ``skew`` counts on (the warm-up call is not counted)."""
        self.mode = MODE_FILE.read_text().strip() if MODE_FILE.exists() else "ok"
        self.calls = -1
        self.lock = threading.Lock()

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``input = raw / 10``, unless the mode or the input says otherwise."""
        raw = inputs["raw"]
        with self.lock:
            self.calls += 1
            call = self.calls
        if (raw < 0).any():
            raise ValueError("negative length in raw")
        if raw.size and raw.flat[0] == SLOW_MARKER:
            time.sleep(2)
        # Call 0 is the runtime's warm-up on zeros: it must pass for the model to load at all.
        if self.mode == "fail" and call > 0:
            raise RuntimeError("this shadow always fails (mode: fail)")
        if self.mode == "sleep" and call > 0:
            time.sleep(2)
        scaled = raw / 10
        if self.mode == "skew" and call > 0 and call % 4 == 0:
            scaled = scaled + 1
        return {"input": scaled}
