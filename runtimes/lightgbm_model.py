"""The ``lightgbm`` runtime: a LightGBM Booster saved as its native model text file (``save_model``).

The first file listed in serving.yaml is the model. One input, the feature matrix [-1, num_features]. Outputs by
name, as for scikit-learn: "proba" outputs are class probabilities like ``LGBMClassifier.predict_proba`` ([-1, 2]
for binary, [-1, num_class] for multi-class); other outputs are the class index for classifiers and the
prediction for every other objective.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from protos.topology.models import Signature
from runtimes.base import ModelRuntime
from runtimes.errors import ModelLoadError
from runtimes.serving_config import ServingConfig
from runtimes.signatures import check_signature, source_name
from runtimes.tabular import feature_input, is_proba, tabular_signature

_MULTICLASS = ("multiclass", "softmax", "multiclassova", "multiclass_ova", "ova", "ovr")


def _load_booster(model_dir: Path, config: ServingConfig) -> Any:
    import lightgbm

    if not config.files:
        raise ModelLoadError("the lightgbm runtime needs the model text file as the first entry of 'files'")
    name = config.files[0]
    try:
        return lightgbm.Booster(model_file=str(model_dir / name))
    except Exception as exc:
        raise ModelLoadError(f"cannot load {name} with lightgbm: {exc}") from exc


def _describe(booster: Any) -> tuple[str, int]:
    """The objective's name and the number of classes (0 when the model is not a classifier)."""
    # The file's "objective=multiclass num_class:3" line comes back as params["objective"] == "multiclass".
    objective = str(booster.params.get("objective", "")).split(" ", 1)[0]
    if objective == "binary":
        return objective, 2
    if objective in _MULTICLASS:
        return objective, int(booster.num_model_per_iteration())
    return objective, 0


def _signature(booster: Any, config: ServingConfig) -> Signature:
    objective, classes = _describe(booster)
    return tabular_signature(
        config,
        int(booster.num_feature()),
        classes or None,
        [-1],
        f"a LightGBM model with objective {objective or 'unknown'}",
        proba_datatype="FP64",
        features_datatype="FP64",
        # Class indices fit any number type; every other objective (regression, ranking, raw scores) gives floats.
        predict_datatype=None if classes else "FP64",
    )


def signature_of(model_dir: Path, config: ServingConfig) -> Signature:
    """[-1, num_features] in; [-1, classes] for probabilities, [-1] for predictions out."""
    return _signature(_load_booster(model_dir, config), config)


class LightGBMRuntime(ModelRuntime):
    """Serves a LightGBM Booster."""

    kind: ClassVar[str] = "lightgbm"

    def __init__(self, model_dir: Path, config: ServingConfig) -> None:
        super().__init__(model_dir, config)
        self._booster: Any = None
        self._classes = 0
        self._input = ""
        self._proba = [spec.name for spec in config.signature.outputs if is_proba(spec.name)]
        self._predict = [spec.name for spec in config.signature.outputs if not is_proba(spec.name)]
        # Booster.predict is not documented as thread-safe, and it already uses every core through OpenMP for a
        # batch, so serializing calls costs little and rules out races inside the C library.
        self._lock = threading.Lock()

    def load(self) -> None:
        """Load the Booster and check it against the declared signature."""
        booster = _load_booster(self.model_dir, self.config)
        self._input = feature_input(self.config)
        check_signature(self.config.signature, _signature(booster, self.config), source_name(self.kind))
        self._classes = _describe(booster)[1]
        self._booster = booster

    def predict(self, inputs: dict[str, np.ndarray]) -> Mapping[str, Any]:
        """Probabilities for "proba" outputs, class indices (classifiers) or values for the others."""
        if self._booster is None:
            raise RuntimeError("the model is not loaded")
        features = inputs[self._input]
        with self._lock:
            raw = np.asarray(self._booster.predict(features))
        results: dict[str, Any] = {}
        if self._classes == 2:
            # Binary models predict the probability of class 1; predict_proba has a column per class.
            positive = raw.reshape(-1)
            probabilities = np.column_stack([1.0 - positive, positive])
        elif self._classes:
            probabilities = raw.reshape(len(features), self._classes)
        else:
            probabilities = None
        for name in self._proba:
            results[name] = probabilities
        for name in self._predict:
            results[name] = raw if probabilities is None else np.argmax(probabilities, axis=1)
        return results
