"""The ``xgboost`` runtime: a Booster saved with ``save_model`` in XGBoost's JSON or UBJSON format.

The first file listed in serving.yaml is the model, whatever its name (``.json``, ``.ubj``, ``model.bst``; an
``XGBClassifier`` saves the same Booster). One input, the feature matrix [-1, num_features]. Outputs by name, as
for scikit-learn: "proba" outputs are class probabilities like ``XGBClassifier.predict_proba`` ([-1, 2] for binary
objectives, [-1, num_class] for multi-class); other outputs are the class index for classifiers and the prediction
for every other objective.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from protos.topology.models import Signature
from runtimes.base import ModelRuntime
from runtimes.errors import ModelLoadError
from runtimes.serving_config import ServingConfig
from runtimes.signatures import check_signature, source_name
from runtimes.tabular import empty_answers, feature_input, is_empty_batch, is_proba, tabular_signature

#: The time and C++ source location XGBoost puts in front of its messages.
_SOURCE_PREFIX = re.compile(r"^\[\d\d:\d\d:\d\d\] \S+:\d+: ")
#: Binary objectives whose prediction is the probability of class 1.
_BINARY_PROBABILITY = ("binary:logistic",)
#: Multi-class objectives; softmax predicts the class index, softprob the probabilities.
_MULTICLASS = ("multi:softmax", "multi:softprob")
#: Objectives that are no classifier here but predict whole numbers (0 or 1).
_WHOLE_PREDICTIONS = ("binary:hinge",)


def _load_booster(model_dir: Path, config: ServingConfig) -> Any:
    import xgboost

    if not config.files:
        raise ModelLoadError("the xgboost runtime needs the model file (save_model) as the first entry of 'files'")
    name = config.files[0]
    path = model_dir / name
    try:
        if name.endswith((".json", ".ubj")):
            booster = xgboost.Booster(model_file=str(path))
        else:
            # Any other name ("model.bst" in XGBoost's own docs; save_model writes UBJSON for it): from a file,
            # XGBoost would guess the format from the extension with a warning; from bytes it tells JSON from
            # UBJSON by their content.
            content = path.read_bytes()
            if not content:
                # An empty buffer aborts the whole process inside XGBoost (std::terminate), an empty file does not.
                raise ModelLoadError(f"cannot load {name} with xgboost: the file is empty")
            booster = xgboost.Booster()
            booster.load_model(bytearray(content))
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load {name} with xgboost: {_reason(exc)}") from exc
    return booster


def _reason(exc: Exception) -> str:
    """XGBoost's error on one line, without the C++ backtrace it appends ("Stack trace:" and a line per frame) and
    the "[16:29:40] /workspace/src/c_api/c_api.cc:1532: " of its build tree in front."""
    text = " ".join(str(exc).split("Stack trace:", 1)[0].split())
    return _SOURCE_PREFIX.sub("", text)


def _describe(booster: Any) -> tuple[str, int, int]:
    """The objective, the number of classes (0 when not a classifier) and the number of targets."""
    learner = json.loads(booster.save_config())["learner"]
    objective = str(learner["objective"]["name"])
    params = learner["learner_model_param"]
    num_class = int(params.get("num_class", "0"))
    num_target = int(params.get("num_target", "1"))
    if objective in _BINARY_PROBABILITY:
        return objective, 2, num_target
    if objective in _MULTICLASS:
        return objective, num_class, num_target
    return objective, 0, num_target


def _signature(booster: Any, config: ServingConfig) -> Signature:
    objective, classes, num_target = _describe(booster)
    predict_shape = [-1] if num_target <= 1 else [-1, num_target]
    # Class indices and binary:hinge's 0/1 fit any number type; every other objective predicts floats (FP32).
    whole = classes or objective in _WHOLE_PREDICTIONS
    return tabular_signature(
        config,
        int(booster.num_features()),
        classes or None,
        predict_shape,
        f"an XGBoost model with objective {objective}",
        proba_datatype="FP32",
        features_datatype="FP32",
        predict_datatype=None if whole else "FP32",
    )


def signature_of(model_dir: Path, config: ServingConfig) -> Signature:
    """[-1, num_features] in; [-1, classes] for probabilities, [-1] (or [-1, targets]) for predictions out."""
    return _signature(_load_booster(model_dir, config), config)


class XGBoostRuntime(ModelRuntime):
    """Serves an XGBoost Booster with ``inplace_predict`` (thread-safe, no DMatrix per request)."""

    kind: ClassVar[str] = "xgboost"

    def __init__(self, model_dir: Path, config: ServingConfig) -> None:
        super().__init__(model_dir, config)
        self._booster: Any = None
        self._objective = ""
        self._input = ""
        self._proba = [spec.name for spec in config.signature.outputs if is_proba(spec.name)]
        self._predict = [spec.name for spec in config.signature.outputs if not is_proba(spec.name)]

    def load(self) -> None:
        """Load the Booster and check it against the declared signature."""
        booster = _load_booster(self.model_dir, self.config)
        self._input = feature_input(self.config)
        check_signature(self.config.signature, _signature(booster, self.config), source_name(self.kind))
        # The data plane runs predictions on several threads already; XGBoost's own pool would oversubscribe.
        booster.set_param({"nthread": 1})
        self._objective = _describe(booster)[0]
        self._booster = booster

    def _probabilities(self, features: np.ndarray) -> np.ndarray:
        if self._objective in _BINARY_PROBABILITY:
            positive = np.asarray(self._booster.inplace_predict(features)).reshape(-1)
            return np.column_stack([1.0 - positive, positive])
        if self._objective == "multi:softprob":
            return np.asarray(self._booster.inplace_predict(features))
        # multi:softmax predicts indices; its margins give the probabilities softprob would.
        margin = np.asarray(self._booster.inplace_predict(features, predict_type="margin"), dtype=np.float64)
        exp = np.exp(margin - margin.max(axis=1, keepdims=True))
        return np.asarray(exp / exp.sum(axis=1, keepdims=True))

    def predict(self, inputs: dict[str, np.ndarray]) -> Mapping[str, Any]:
        """Probabilities for "proba" outputs, class indices (classifiers) or values for the others."""
        if self._booster is None:
            raise RuntimeError("the model is not loaded")
        features = inputs[self._input]
        if is_empty_batch(features):
            # XGBoost answers 0 rows with 1-D arrays whatever the number of classes; no rows in is no rows out.
            return empty_answers(self.config)
        results: dict[str, Any] = {}
        probabilities = None
        if self._proba or (self._predict and self._objective in (*_BINARY_PROBABILITY, "multi:softprob")):
            probabilities = self._probabilities(features)
        for name in self._proba:
            results[name] = probabilities
        if self._predict:
            if probabilities is not None:
                prediction = np.argmax(probabilities, axis=1)
            else:
                prediction = np.asarray(self._booster.inplace_predict(features))
            for name in self._predict:
                results[name] = prediction
        return results
