"""The ``sklearn`` runtime: a scikit-learn estimator saved with joblib.

The first file listed in serving.yaml is the estimator. The signature has one input, the feature matrix (a BYTES
input reaches the estimator as ``str``, UTF-8 decoded). Each output whose name contains "proba" is
``predict_proba``, every other output is ``predict``; the data plane casts them to the signature's datatypes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import joblib
import numpy as np
import sklearn
from sklearn.base import is_regressor
from sklearn.utils import get_tags

from protos.topology.models import Signature
from runtimes.base import ModelRuntime
from runtimes.errors import InvalidInput, ModelLoadError
from runtimes.serving_config import ServingConfig
from runtimes.signatures import check_signature, source_name
from runtimes.tabular import empty_answers, is_empty_batch, tabular_signature
from runtimes.tensors import text_array


def _method_for(output_name: str) -> str:
    return "predict_proba" if "proba" in output_name.lower() else "predict"


#: Classifiers whose ``predict`` is by definition ``classes_[argmax(predict_proba)]`` (first class on ties), so one
#: ``predict_proba`` call answers both kinds of output. Not SVC: its Platt-scaled probabilities can disagree with
#: its decision function.
ARGMAX_CLASSIFIERS = frozenset(
    {
        "LogisticRegression",
        "DecisionTreeClassifier",
        "ExtraTreeClassifier",
        "RandomForestClassifier",
        "ExtraTreesClassifier",
        "GaussianNB",
        "MultinomialNB",
        "BernoulliNB",
        "ComplementNB",
        "CategoricalNB",
        "KNeighborsClassifier",
        "GradientBoostingClassifier",
        "HistGradientBoostingClassifier",
        "MLPClassifier",
    }
)


def _predict_from_proba(model: Any) -> bool:
    # A Pipeline predicts with its last step; what matters is that step's class.
    final = getattr(model, "_final_estimator", model)
    return type(final).__name__ in ARGMAX_CLASSIFIERS and hasattr(model, "classes_")


class SklearnRuntime(ModelRuntime):
    """Serves a joblib-saved scikit-learn estimator (or pipeline)."""

    kind: ClassVar[str] = "sklearn"
    # A 1-row predict of a typical estimator costs ~0.1 ms: less than the hop to a worker thread and back.
    inline_rows: ClassVar[int] = 16

    def __init__(self, model_dir: Path, config: ServingConfig) -> None:
        super().__init__(model_dir, config)
        self._model: Any = None
        signature = config.signature
        self._input = signature.inputs[0].name
        self._methods = {spec.name: _method_for(spec.name) for spec in signature.outputs}
        self._labels_from_proba = False
        self._allows_nan = True

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
        # predict and predict_proba both run the whole model; for a 1-row request that doubled the latency.
        self._labels_from_proba = set(self._methods.values()) == {"predict", "predict_proba"} and _predict_from_proba(
            model
        )
        check_signature(self.config.signature, _signature(model, self.config), source_name(self.kind))
        self._allows_nan = _allows_nan(model)
        self._model = model

    def predict(self, inputs: dict[str, np.ndarray]) -> Mapping[str, Any]:
        """Run each needed estimator method once and map the results to the signature's outputs."""
        if self._model is None:
            raise RuntimeError("the model is not loaded")
        features = inputs[self._input]
        if is_empty_batch(features):
            # sklearn refuses 0 samples ("Found array with 0 sample(s)"); no rows in is no rows out.
            return empty_answers(self.config)
        if features.dtype.kind != "f":
            if features.dtype.kind == "O":
                # BYTES arrive as bytes; estimators fitted on strings (pandas, CSV) compare categories as str.
                features = text_array(self._input, features)
            # Integers cannot be NaN; object arrays are sklearn's to judge.
            return self._call(self._model, features)
        if not self._allows_nan and not np.isfinite(features).all():
            raise InvalidInput(
                f"input {self._input!r} contains NaN or infinity, which {type(self._model).__name__} does not accept"
            )
        # sklearn's own finiteness check costs ~10 us of a ~90 us one-row call; numpy did it above in ~1 us.
        # set_config and back, not config_context: its restore re-applies every setting (~8 us, measured).
        # sklearn's config is per thread, so predicts on other threads are not affected.
        if sklearn.get_config()["assume_finite"]:
            return self._call(self._model, features)
        sklearn.set_config(assume_finite=True)
        try:
            return self._call(self._model, features)
        finally:
            sklearn.set_config(assume_finite=False)

    def _call(self, model: Any, features: np.ndarray) -> Mapping[str, Any]:
        results: dict[str, Any] = {}
        if self._labels_from_proba:
            proba = model.predict_proba(features)
            results["predict_proba"] = proba
            results["predict"] = model.classes_.take(np.argmax(proba, axis=1))
            return {output: results[method] for output, method in self._methods.items()}
        for method in set(self._methods.values()):
            results[method] = getattr(model, method)(features)
        return {output: results[method] for output, method in self._methods.items()}


def _allows_nan(model: Any) -> bool:
    """Whether the estimator accepts missing values (its input tags say; unknown estimators are trusted to)."""
    try:
        return bool(get_tags(model).input_tags.allow_nan)
    except Exception:
        # Third-party estimators without sklearn tags: let them see the NaN and decide.
        return True


def signature_of(model_dir: Path, config: ServingConfig) -> Signature:
    """[-1, n_features_in_] in and [-1, len(classes_)] for "proba" outputs, where the estimator knows them."""
    if not config.files:
        raise ModelLoadError("the sklearn runtime needs the joblib file as the first entry of 'files'")
    try:
        model = joblib.load(model_dir / config.files[0])
    except Exception as exc:
        raise ModelLoadError(f"cannot load {config.files[0]} with joblib: {exc!r}") from exc
    return _signature(model, config)


def _signature(model: Any, config: ServingConfig) -> Signature:
    features = getattr(model, "n_features_in_", None)
    classes = getattr(model, "classes_", None)
    # Multi-output classifiers have a list of class arrays and predict_proba returns a list: width unknown.
    width = len(classes) if isinstance(classes, np.ndarray) and classes.ndim == 1 else -1
    has_proba = callable(getattr(model, "predict_proba", None))
    return tabular_signature(
        config,
        int(features) if isinstance(features, int | np.integer) else None,
        width if has_proba else None,
        None,
        f"the scikit-learn model ({type(model).__name__}, without predict_proba)",
        proba_datatype="FP64",
        predict_datatype=_prediction_datatype(model, classes),
    )


def _prediction_datatype(model: Any, classes: Any) -> str | None:
    """What ``predict`` gives where only some datatypes hold it: floats (FP64) for a regressor, BYTES for classes
    that are names; None (any datatype) otherwise: class numbers, cluster indices, estimators sklearn cannot tell."""
    try:
        if is_regressor(model):
            return "FP64"
    except Exception:
        # Third-party estimators without sklearn tags: nothing known.
        return None
    if isinstance(classes, np.ndarray) and classes.ndim == 1 and classes.size:
        if classes.dtype.kind in "US" or (
            classes.dtype.kind == "O" and all(isinstance(c, str | bytes) for c in classes.tolist())
        ):
            return "BYTES"
        if classes.dtype.kind == "f" and not np.array_equal(classes, np.round(classes)):
            return "FP64"
    return None
