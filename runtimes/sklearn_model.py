"""The ``sklearn`` runtime: a scikit-learn estimator saved with joblib.

The first file listed in serving.yaml is the estimator. The signature has one input, the feature matrix. Each
output whose name contains "proba" is ``predict_proba``, every other output is ``predict``; the data plane casts
them to the signature's datatypes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import joblib
import numpy as np

from runtimes.base import ModelRuntime
from runtimes.errors import ModelLoadError
from runtimes.serving_config import ServingConfig


def _method_for(output_name: str) -> str:
    return "predict_proba" if "proba" in output_name.lower() else "predict"


class SklearnRuntime(ModelRuntime):
    """Serves a joblib-saved scikit-learn estimator (or pipeline)."""

    kind: ClassVar[str] = "sklearn"

    def __init__(self, model_dir: Path, config: ServingConfig) -> None:
        super().__init__(model_dir, config)
        self._model: Any = None
        signature = config.signature
        self._input = signature.inputs[0].name
        self._methods = {spec.name: _method_for(spec.name) for spec in signature.outputs}

    def load(self) -> None:
        """Unpickle the estimator and check it has the methods the signature's outputs need."""
        if not self.config.files:
            raise ModelLoadError("the sklearn runtime needs the joblib file as the first entry of 'files'")
        if len(self.config.signature.inputs) != 1:
            names = ", ".join(spec.name for spec in self.config.signature.inputs)
            raise ModelLoadError(f"the sklearn runtime takes exactly one input (the feature matrix), got: {names}")
        path = self.model_dir / self.config.files[0]
        try:
            model = joblib.load(path)
        except Exception as exc:
            raise ModelLoadError(f"cannot load {self.config.files[0]} with joblib: {exc!r}") from exc
        for output, method in self._methods.items():
            if not callable(getattr(model, method, None)):
                raise ModelLoadError(f"output {output!r} needs {type(model).__name__}.{method}, which it lacks")
        self._model = model

    def predict(self, inputs: dict[str, np.ndarray]) -> Mapping[str, Any]:
        """Run each needed estimator method once and map the results to the signature's outputs."""
        if self._model is None:
            raise RuntimeError("the model is not loaded")
        features = inputs[self._input]
        results: dict[str, Any] = {}
        for method in set(self._methods.values()):
            results[method] = getattr(self._model, method)(features)
        return {output: results[method] for output, method in self._methods.items()}
