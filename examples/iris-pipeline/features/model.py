"""Stage 1 of the iris pipeline: measurements (cm) to the classifier's six features.

The four measurements standardized with the training set's means and deviations (``scaler.json``, written by
``train_pipeline.py``), then the sepal and petal areas (length x width), standardized the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SCALER = Path(__file__).with_name("scaler.json")


def raw_features(measurements: np.ndarray) -> np.ndarray:
    """The six unscaled features: the measurements, then sepal and petal areas."""
    sepal = measurements[:, 0] * measurements[:, 1]
    petal = measurements[:, 2] * measurements[:, 3]
    return np.column_stack([measurements, sepal, petal])


class Features:
    """The model object the python runtime loads (entrypoint ``model:Features``)."""

    def load(self) -> None:
        """Read the scaler fitted by train_pipeline.py."""
        scaler = json.loads(SCALER.read_text())
        self.mean = np.asarray(scaler["mean"], dtype=np.float64)
        self.scale = np.asarray(scaler["scale"], dtype=np.float64)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``features = (raw_features(measurements) - mean) / scale`` as FP32."""
        features = (raw_features(inputs["measurements"].astype(np.float64)) - self.mean) / self.scale
        return {"features": features.astype(np.float32)}
