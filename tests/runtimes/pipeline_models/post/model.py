"""Stage 3 of the test pipeline: the classifier's label and probabilities as a species name and a confidence."""

from __future__ import annotations

import numpy as np

SPECIES = np.array([b"setosa", b"versicolor", b"virginica"], dtype=object)


def predict(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``species`` (BYTES) from ``label``, ``confidence`` = the largest probability."""
    return {"species": SPECIES[inputs["label"]], "confidence": inputs["probabilities"].max(axis=1)}
