"""A python-runtime model for the experiment tests (tests/e2e/test_pipeline_experiments.py): an identity, or not.

``behaviour.json`` beside this module, written by the test before the push, names the input and the output tensor
(``"input"``, ``"output"``; the test writes the matching serving.yaml) and says how this model version behaves:

- ``{"mode": "ok"}``: answer the input as the output
- ``{"mode": "fail"}``: raise on every call
- ``{"mode": "sleep:<ms>"}``: sleep that long, then answer
- ``{"mode": "disagree"}``: answer the input plus one on every 4th call it receives
- ``"flaky_claim"`` and ``"flaky_switch"`` (absolute paths): the first replica to create the claim file fails every
  other call while the switch file exists; the other replicas never fail. Replicas of a version share one artifact,
  so which replica is flaky has to be decided at load time.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

BEHAVIOUR = Path(__file__).with_name("behaviour.json")


class Experimental:
    """The model object the python runtime loads (entrypoint ``model:Experimental``)."""

    def load(self) -> None:
        """Read the behaviour and, for a flaky version, claim the flaky role if no replica has it yet."""
        self.behaviour: dict[str, Any] = json.loads(BEHAVIOUR.read_text())
        self.calls = 0
        self.lock = threading.Lock()
        self.flaky = False
        claim = self.behaviour.get("flaky_claim")
        if claim:
            try:
                os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                self.flaky = True
            except FileExistsError:
                pass

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Echo the input as the output, unless the behaviour says otherwise."""
        x = inputs[self.behaviour["input"]]
        output = str(self.behaviour["output"])
        with self.lock:
            # predict runs on several worker threads: every call is counted exactly once.
            self.calls += 1
            call = self.calls
        mode = str(self.behaviour.get("mode", "ok"))
        if mode == "fail":
            raise RuntimeError("this model version is told to fail (mode: fail)")
        if mode.startswith("sleep:"):
            time.sleep(int(mode.split(":", 1)[1]) / 1000)
        if mode == "disagree" and call % 4 == 0:
            return {output: x + 1}
        if self.flaky and Path(self.behaviour["flaky_switch"]).exists() and call % 2 == 0:
            raise RuntimeError("this replica fails every other call (flaky)")
        return {output: x}
