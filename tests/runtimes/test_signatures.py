"""Inferred signatures and their comparison with serving.yaml, in process and through the registration probe."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from framework_models import lightgbm_classifier, onnx_classifier, sklearn_classifier, xgboost_classifier

from protos.topology.models import Signature, TensorSpec
from runtimes.serving_config import ServingConfigError, load_serving_config, parse_serving_config
from runtimes.signatures import (
    INFERRING_KINDS,
    SignatureCheckFailed,
    SignatureMismatch,
    compare_signatures,
    infer_signature,
    verify_signature,
)


def _sig(inputs: list[tuple[str, str, list[int]]], outputs: list[tuple[str, str, list[int]]]) -> Signature:
    return Signature(
        inputs=[TensorSpec(name=n, datatype=d, shape=s) for n, d, s in inputs],  # type: ignore[arg-type]
        outputs=[TensorSpec(name=n, datatype=d, shape=s) for n, d, s in outputs],  # type: ignore[arg-type]
    )


KNOWN = _sig([("x", "FP32", [-1, 4]), ("mask", "BOOL", [-1])], [("y", "FP32", [-1, 3]), ("z", "INT64", [-1])])


def test_an_equal_or_narrower_signature_fits() -> None:
    assert compare_signatures(KNOWN, KNOWN) == []
    # A dimension the model leaves open may be fixed by serving.yaml; outputs may be a subset.
    narrower = _sig([("mask", "BOOL", [8]), ("x", "FP32", [8, 4])], [("z", "INT64", [8])])
    assert compare_signatures(narrower, KNOWN) == []


@pytest.mark.parametrize(
    ("declared", "problem"),
    [
        (
            _sig([("x", "FP32", [-1, 3]), ("mask", "BOOL", [-1])], [("y", "FP32", [-1, 3])]),
            "signature.inputs[0].shape: the model says [-1, 4], serving.yaml says [-1, 3]",
        ),
        (
            _sig([("x", "FP32", [-1, -1]), ("mask", "BOOL", [-1])], [("y", "FP32", [-1, 3])]),
            "signature.inputs[0].shape: the model says [-1, 4], serving.yaml says [-1, -1]",
        ),
        (
            _sig([("x", "FP32", [-1, 4]), ("mask", "BOOL", [-1, 1])], [("y", "FP32", [-1, 3])]),
            "signature.inputs[1].shape: the model says [-1], serving.yaml says [-1, 1]",
        ),
        (
            _sig([("x", "FP64", [-1, 4]), ("mask", "BOOL", [-1])], [("y", "FP32", [-1, 3])]),
            "signature.inputs[0].datatype: the model says FP32, serving.yaml says FP64",
        ),
        (
            _sig([("x", "FP32", [-1, 4]), ("mask", "BOOL", [-1])], [("y", "FP32", [-1, 3]), ("p", "FP32", [-1])]),
            "signature.outputs[1].name: the model has no output 'p' (it has: 'y', 'z')",
        ),
        (
            _sig([("x", "FP32", [-1, 4]), ("extra", "BOOL", [-1])], [("y", "FP32", [-1, 3])]),
            "signature.inputs[1].name: the model has no input 'extra' (it has: 'x', 'mask')",
        ),
        (
            _sig([("x", "FP32", [-1, 4])], [("y", "FP32", [-1, 3])]),
            "signature.inputs: the model needs input 'mask' (BOOL [-1]), which serving.yaml does not declare",
        ),
    ],
)
def test_each_disagreement_names_its_field(declared: Signature, problem: str) -> None:
    problems = compare_signatures(declared, KNOWN)
    assert problems[0] == problem
    # A renamed input is also a missing one; nothing else is reported.
    assert problems[1:] == [p for p in problems[1:] if "needs input" in p]


def test_sklearn_signature_from_n_features_and_classes(tmp_path: Path) -> None:
    folder = sklearn_classifier(tmp_path / "m")
    signature = infer_signature(folder, load_serving_config(folder))
    assert signature is not None
    assert [(s.name, s.shape) for s in signature.inputs] == [("input", [-1, 4])]
    # predict's shape is the declared one (scikit-learn does not say); predict_proba's width is len(classes_).
    assert [(s.name, s.shape) for s in signature.outputs] == [("label", [-1]), ("probabilities", [-1, 3])]


def test_python_models_start_no_probe(tmp_path: Path) -> None:
    assert "python" not in INFERRING_KINDS
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "serving.yaml").write_text(
        "runtime: python\nentrypoint: model:predict\nsignature:\n"
        "  inputs: [{name: x, datatype: FP32, shape: [-1]}]\n  outputs: [{name: y, datatype: FP32, shape: [-1]}]\n"
    )
    started = time.monotonic()
    verify_signature(folder, load_serving_config(folder))
    assert time.monotonic() - started < 0.5


def test_probe_passes_a_matching_folder_and_names_the_field_of_a_mismatch(tmp_path: Path) -> None:
    good = lightgbm_classifier(tmp_path / "good")
    verify_signature(good, load_serving_config(good))
    bad = sklearn_classifier(tmp_path / "bad", features=3)
    with pytest.raises(SignatureMismatch) as error:
        verify_signature(bad, load_serving_config(bad))
    assert str(error.value) == (
        "signature.inputs[0].shape: the scikit-learn model says [-1, 4], serving.yaml says [-1, 3]"
    )


def test_probe_reports_a_model_that_does_not_load(tmp_path: Path) -> None:
    folder = xgboost_classifier(tmp_path / "m")
    (folder / "iris.ubj").write_bytes(b"garbage")
    with pytest.raises(SignatureCheckFailed, match=r"the xgboost model does not load: cannot load iris\.ubj"):
        verify_signature(folder, load_serving_config(folder))


def test_probe_timeout(tmp_path: Path) -> None:
    folder = onnx_classifier(tmp_path / "m")
    with pytest.raises(SignatureCheckFailed, match=r"took longer than 0\.01 s"):
        verify_signature(folder, load_serving_config(folder), timeout=0.01)


def test_a_boolean_dimension_is_named_not_read_as_1() -> None:
    text = """
runtime: python
entrypoint: model:Model
signature:
  inputs: [{name: x, datatype: FP32, shape: [true, 4]}]
  outputs: [{name: y, datatype: FP32, shape: [-1]}]
"""
    with pytest.raises(ServingConfigError, match=r"signature\.inputs\.0\.shape.*not true/false"):
        parse_serving_config(text)
