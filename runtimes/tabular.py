"""What the tabular runtimes (scikit-learn, XGBoost, LightGBM) share: one feature matrix in, outputs by name.

An output whose name contains "proba" is the class probabilities, shape [-1, classes] (``predict_proba``); every
other output is the prediction: the class index for classifiers, the value for regressors.
"""

from __future__ import annotations

import numpy as np

from protos.topology.models import Signature, TensorSpec
from runtimes.errors import ModelLoadError
from runtimes.serving_config import ServingConfig
from runtimes.tensors import format_shape, zeros


def is_proba(output_name: str) -> bool:
    """Whether an output of this name is served as class probabilities."""
    return "proba" in output_name.lower()


def feature_input(config: ServingConfig) -> str:
    """The name of the single input (the feature matrix); ModelLoadError if the signature has several."""
    if len(config.signature.inputs) != 1:
        names = ", ".join(spec.name for spec in config.signature.inputs)
        raise ModelLoadError(f"the {config.runtime} runtime takes exactly one input (the feature matrix), got: {names}")
    return config.signature.inputs[0].name


def is_empty_batch(features: np.ndarray) -> bool:
    """Whether the feature matrix has no rows: a valid tensor that frameworks such as scikit-learn refuse."""
    return features.ndim > 0 and features.shape[0] == 0


def empty_answers(config: ServingConfig) -> dict[str, np.ndarray]:
    """Every declared output with no rows (wildcard dimensions after the first are 0): a tabular model's answer to
    a batch of no rows, one output row per input row."""
    return {
        spec.name: zeros(spec.datatype, [0, *(max(size, 0) for size in spec.shape[1:])])
        for spec in config.signature.outputs
    }


#: Datatypes that hold a float prediction without losing it (an integer type would truncate it, BYTES make it text).
FLOAT_DATATYPES = ("FP16", "FP32", "FP64")


def _holding(declared: str, natural: str | None) -> str:
    """``declared`` if it can hold values whose own datatype is ``natural`` (None: any datatype can), else
    ``natural``, so that the signature comparison names the field, what the model gives and what was declared."""
    if natural is None or declared == natural:
        return declared
    if natural in FLOAT_DATATYPES and declared in FLOAT_DATATYPES:
        return declared
    return natural


def tabular_signature(
    config: ServingConfig,
    num_features: int | None,
    classes: int | None,
    predict_shape: list[int] | None,
    what: str,
    *,
    proba_datatype: str,
    predict_datatype: str | None,
    features_datatype: str | None = None,
) -> Signature:
    """The signature a tabular model implies, with the declared names and, where they hold the model's values, the
    declared datatypes (the data plane converts outputs to those).

    ``num_features`` and ``classes`` are None when the model does not know them; ``classes`` None also means a
    declared probabilities output is an error (``what`` names the model in that message). ``predict_shape`` None
    keeps the declared shape of prediction outputs. ``proba_datatype`` is the probabilities' own datatype (any
    float datatype holds them); ``predict_datatype`` the predictions' own: a float datatype for regressors (any
    float datatype holds them), BYTES for class names, None for class indices (any number type holds them).
    ``features_datatype`` is what the model computes features in when they must be numbers (any number type is
    converted to it; BYTES is not), None when text is fine too (scikit-learn's encoders and vectorizers).
    """
    feature_input(config)
    declared = config.signature.inputs[0]
    if num_features is None:
        # Not even the rank is known: a text vectorizer (no n_features_in_) takes one document per row, [-1].
        shape = list(declared.shape)
    else:
        shape = [-1, num_features if num_features > 0 else -1]
    input_datatype = declared.datatype
    if features_datatype is not None and input_datatype == "BYTES":
        input_datatype = features_datatype  # type: ignore[assignment]
    inputs = [TensorSpec(name=declared.name, datatype=input_datatype, shape=shape)]
    outputs = []
    for index, spec in enumerate(config.signature.outputs):
        probabilities_shape = classes is not None and classes > 0 and spec.shape == [-1, classes]
        if probabilities_shape and not is_proba(spec.name) and predict_shape != spec.shape:
            # The shape says probabilities, the name says prediction: the comparison's "[-1] vs [-1, 3]" would not
            # tell the user that the name decides.
            raise ModelLoadError(
                f"signature.outputs[{index}].name: {spec.name!r} is declared like class probabilities "
                f"({format_shape(spec.shape)}), but only outputs whose name contains 'proba' are; the others are the "
                "predicted class, [-1]"
            )
        if is_proba(spec.name):
            if classes is None:
                raise ModelLoadError(f"output {spec.name!r} asks for class probabilities, but {what} is no classifier")
            datatype = _holding(spec.datatype, proba_datatype)
            outputs.append(TensorSpec(name=spec.name, datatype=datatype, shape=[-1, classes]))  # type: ignore[arg-type]
        else:
            shape = spec.shape if predict_shape is None else predict_shape
            datatype = _holding(spec.datatype, predict_datatype)
            outputs.append(TensorSpec(name=spec.name, datatype=datatype, shape=shape))  # type: ignore[arg-type]
    return Signature(inputs=inputs, outputs=outputs)
