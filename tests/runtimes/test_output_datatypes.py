"""Outputs whose values do not fit the declared datatype: refused, never truncated or wrapped into a wrong answer.

A regressor's prediction declared INT64 came back truncated (1.7 -> 1) and probabilities declared INT64 came back
all zeros, with a 200. The tabular frameworks now refuse such a serving.yaml when the model is loaded (and so when
it is registered, naming the field); any model whose values do not fit at predict time (a python model) gets a
500 naming the output.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import joblib
import lightgbm
import numpy as np
import pytest
from framework_models import (
    CLASSES,
    FEATURES,
    ROWS,
    TABULAR_YAML,
    lightgbm_classifier,
    serve_in_process,
    sklearn_classifier,
    xgboost_classifier,
    xgboost_regressor,
)
from sklearn.linear_model import LinearRegression, LogisticRegression

from runtimes.errors import ModelLoadError, PredictError
from runtimes.serving_config import load_serving_config
from runtimes.signatures import compare_signatures, infer_signature

PYTHON_MODEL = """
import numpy as np

def predict(inputs):
    return {"y": np.asarray(VALUES)}
"""

PYTHON_YAML = """\
runtime: python
files: [MODULE.py]
entrypoint: MODULE:predict
signature:
  inputs: [{name: x, datatype: FP32, shape: [-1]}]
  outputs: [{name: y, datatype: DATATYPE, shape: [-1]}]
"""


def _python_model(folder: Path, values: str, datatype: str) -> Path:
    # A module name of its own: the runtime refuses to replace a module of the same name imported by another test.
    module = f"values_{uuid.uuid4().hex}"
    folder.mkdir(parents=True)
    (folder / f"{module}.py").write_text(PYTHON_MODEL.replace("VALUES", values))
    (folder / "serving.yaml").write_text(PYTHON_YAML.replace("DATATYPE", datatype).replace("MODULE", module))
    return folder


@pytest.mark.parametrize(
    ("values", "datatype", "shown"),
    [
        ("[0.25, 1.75]", "INT64", "0.25"),  # truncated to [0, 1]
        ("[1.0, float('nan')]", "INT32", "nan"),  # numpy gives an arbitrary integer
        ("[7, 300]", "UINT8", "300"),  # wrapped to 44
        ("[-1, 2]", "UINT32", "-1"),  # wrapped to 4294967295
        ("[0.0, 0.5]", "BOOL", "0.5"),  # became True
        ("[2**70, 1]", "INT64", "too large"),  # an OverflowError escaped the data plane: a traceback, no 500 text
    ],
)
async def test_values_that_do_not_fit_the_declared_datatype_are_a_500(
    tmp_path: Path, values: str, datatype: str, shown: str
) -> None:
    folder = _python_model(tmp_path / "m", values, datatype)
    with pytest.raises((PredictError, ModelLoadError), match=rf"output 'y' is not {datatype}: .*{shown}") as error:
        await serve_in_process(folder, {"x": np.zeros(2, np.float32)})
    # The warm-up call already predicts: the model does not even get ready, with the reason.
    assert isinstance(error.value, ModelLoadError)


@pytest.mark.parametrize(
    ("values", "datatype", "expected"),
    [
        ("[0.0, 2.0]", "INT64", [0, 2]),  # class indices computed in floats (XGBoost's multi:softmax)
        ("[1, 0]", "BOOL", [True, False]),
        ("[3, 4]", "UINT8", [3, 4]),
        ("[0.5, 1.5]", "FP16", [0.5, 1.5]),
    ],
)
async def test_values_that_fit_are_converted(
    tmp_path: Path, values: str, datatype: str, expected: list[object]
) -> None:
    folder = _python_model(tmp_path / "m", values, datatype)
    outputs = await serve_in_process(folder, {"x": np.zeros(2, np.float32)})
    assert outputs["y"].tolist() == expected


def _declare(folder: Path, old: str, new: str) -> None:
    yaml = (folder / "serving.yaml").read_text()
    assert old in yaml
    (folder / "serving.yaml").write_text(yaml.replace(old, new))


def _sklearn_regressor(folder: Path) -> Path:
    folder.mkdir(parents=True)
    joblib.dump(LinearRegression().fit(FEATURES[:, :3], FEATURES[:, 3]), folder / "model.joblib")
    (folder / "serving.yaml").write_text(
        "runtime: sklearn\nfiles: [model.joblib]\nsignature:\n"
        "  inputs: [{name: input, datatype: FP32, shape: [-1, 3]}]\n"
        "  outputs: [{name: width, datatype: FP32, shape: [-1]}]\n"
    )
    return folder


def _lightgbm_regressor(folder: Path) -> Path:
    folder.mkdir(parents=True)
    booster = lightgbm.train(
        {"objective": "regression", "num_leaves": 4, "verbose": -1},
        lightgbm.Dataset(np.ascontiguousarray(FEATURES[:, :3]), label=FEATURES[:, 3].copy()),
        num_boost_round=3,
    )
    booster.save_model(str(folder / "reg.txt"))
    (folder / "serving.yaml").write_text(
        "runtime: lightgbm\nfiles: [reg.txt]\nsignature:\n"
        "  inputs: [{name: input, datatype: FP32, shape: [-1, 3]}]\n"
        "  outputs: [{name: width, datatype: FP32, shape: [-1]}]\n"
    )
    return folder


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (_sklearn_regressor, "the scikit-learn model says FP64"),
        (xgboost_regressor, "the XGBoost model says FP32"),
        (_lightgbm_regressor, "the LightGBM model says FP64"),
    ],
)
@pytest.mark.parametrize("datatype", ["INT64", "UINT8", "BOOL", "BYTES"])
async def test_a_regressors_prediction_must_be_declared_a_float(
    tmp_path: Path, make: object, says: str, datatype: str
) -> None:
    folder = make(tmp_path / "m")  # type: ignore[operator]
    _declare(folder, "name: width, datatype: FP32", f"name: width, datatype: {datatype}")
    expected = f"signature.outputs[0].datatype: {says}, serving.yaml says {datatype}"
    with pytest.raises(ModelLoadError) as error:
        await serve_in_process(folder, {"input": ROWS[:, :3]})
    assert str(error.value) == expected
    # Registration runs the same check, so the version is refused before it is stored.
    config = load_serving_config(folder)
    known = infer_signature(folder, config)
    assert known is not None
    assert [p.split(":", 1)[0] for p in compare_signatures(config.signature, known)] == [
        "signature.outputs[0].datatype"
    ]


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (sklearn_classifier, "the scikit-learn model says FP64"),
        (xgboost_classifier, "the XGBoost model says FP32"),
        (lightgbm_classifier, "the LightGBM model says FP64"),
    ],
)
async def test_probabilities_must_be_declared_a_float(tmp_path: Path, make: object, says: str) -> None:
    folder = make(tmp_path / "m")  # type: ignore[operator]
    _declare(folder, "name: probabilities, datatype: FP32", "name: probabilities, datatype: INT64")
    with pytest.raises(ModelLoadError) as error:
        await serve_in_process(folder, {"input": ROWS})
    assert str(error.value) == f"signature.outputs[1].datatype: {says}, serving.yaml says INT64"


async def test_a_classifier_of_named_classes_answers_bytes(tmp_path: Path) -> None:
    # Labels fitted as strings ("setosa") cannot be INT64: named at load, not "invalid literal for int()" from the
    # warm-up (and registration, which runs no warm-up, let the version in).
    folder = tmp_path / "m"
    folder.mkdir()
    names = np.array(["setosa", "versicolor", "virginica"])[CLASSES]
    joblib.dump(LogisticRegression(max_iter=500).fit(FEATURES, names), folder / "model.joblib")
    (folder / "serving.yaml").write_text(TABULAR_YAML.format(runtime="sklearn", file="model.joblib", features=4))
    with pytest.raises(ModelLoadError) as error:
        await serve_in_process(folder, {"input": ROWS})
    assert str(error.value) == (
        "signature.outputs[0].datatype: the scikit-learn model says BYTES, serving.yaml says INT64"
    )
    _declare(folder, "name: label, datatype: INT64", "name: label, datatype: BYTES")
    outputs = await serve_in_process(folder, {"input": ROWS})
    assert outputs["label"].tolist() == [name.encode() for name in names[[0, 1, 50, 51, 100, 120]]]


@pytest.mark.parametrize("datatype", ["INT32", "UINT8", "FP32", "FP64"])
async def test_class_indices_may_be_any_number_type(tmp_path: Path, datatype: str) -> None:
    for make in (sklearn_classifier, xgboost_classifier, lightgbm_classifier):
        folder = make(tmp_path / make.__name__)
        _declare(folder, "name: label, datatype: INT64", f"name: label, datatype: {datatype}")
        outputs = await serve_in_process(folder, {"input": ROWS})
        assert outputs["label"].tolist() == [0, 0, 1, 1, 2, 2], make.__name__


@pytest.mark.parametrize("make", [sklearn_classifier, xgboost_classifier, lightgbm_classifier])
async def test_probabilities_under_another_name_are_explained(tmp_path: Path, make: object) -> None:
    # Only outputs whose name contains "proba" are probabilities. "probs" [-1, 3] was served predict()'s labels:
    # xgboost/lightgbm said "the XGBoost model says [-1], serving.yaml says [-1, 3]", sklearn failed its warm-up on
    # "output 'probs' has shape [1]", neither saying that the name decides.
    folder = make(tmp_path / "m")  # type: ignore[operator]
    _declare(folder, "name: probabilities,", "name: probs,")
    with pytest.raises(ModelLoadError) as error:
        await serve_in_process(folder, {"input": ROWS})
    assert str(error.value).startswith(
        "signature.outputs[1].name: 'probs' is declared like class probabilities ([-1, 3]), but only outputs whose "
        "name contains 'proba' are; "
    ), str(error.value)


async def test_a_multi_output_classifiers_label_matrix_is_no_probabilities(tmp_path: Path) -> None:
    # Its classes_ is a list (one array per output): the width of its predictions is not a number of classes.
    from sklearn.neighbors import KNeighborsClassifier

    targets = np.column_stack([CLASSES, CLASSES % 2])
    model = KNeighborsClassifier().fit(FEATURES, targets)
    folder = tmp_path / "m"
    folder.mkdir()
    joblib.dump(model, folder / "model.joblib")
    (folder / "serving.yaml").write_text(
        "runtime: sklearn\nfiles: [model.joblib]\nsignature:\n"
        "  inputs: [{name: input, datatype: FP32, shape: [-1, 4]}]\n"
        "  outputs: [{name: labels, datatype: INT64, shape: [-1, -1]}]\n"
    )
    outputs = await serve_in_process(folder, {"input": ROWS})
    np.testing.assert_array_equal(outputs["labels"], model.predict(ROWS))
