"""The xgboost runtime in process: Boosters trained on iris, answers compared with XGBoost's own predictions."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import xgboost
from framework_models import (
    FEATURES,
    ROWS,
    serve_in_process,
    xgboost_binary,
    xgboost_classifier,
    xgboost_regressor,
)

from runtimes.base import create_runtime
from runtimes.errors import ModelLoadError
from runtimes.serving_config import load_serving_config
from runtimes.xgboost_model import XGBoostRuntime, signature_of


def _loaded(folder: Path) -> XGBoostRuntime:
    runtime = create_runtime(folder, load_serving_config(folder))
    assert isinstance(runtime, XGBoostRuntime)
    runtime.load()
    return runtime


def _booster(path: Path) -> xgboost.Booster:
    return xgboost.Booster(model_file=str(path))


@pytest.mark.parametrize("file", ["iris.ubj", "iris.json"])
async def test_softprob_classifier(tmp_path: Path, file: str) -> None:
    folder = xgboost_classifier(tmp_path / "m", file=file)
    outputs = await serve_in_process(folder, {"input": ROWS})
    own = _booster(folder / file).predict(xgboost.DMatrix(ROWS))
    np.testing.assert_allclose(outputs["probabilities"], own, rtol=1e-6)
    np.testing.assert_array_equal(outputs["label"], np.argmax(own, axis=1))
    assert outputs["label"].tolist() == [0, 0, 1, 1, 2, 2]


def test_softmax_classifier_still_gives_probabilities(tmp_path: Path) -> None:
    folder = xgboost_classifier(tmp_path / "m", objective="multi:softmax")
    result = _loaded(folder).predict({"input": FEATURES})
    booster = _booster(folder / "iris.ubj")
    np.testing.assert_array_equal(result["label"], booster.predict(xgboost.DMatrix(FEATURES)))
    np.testing.assert_allclose(np.sum(result["probabilities"], axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(np.argmax(result["probabilities"], axis=1), result["label"])


def test_binary_probabilities_have_a_column_per_class(tmp_path: Path) -> None:
    folder = xgboost_binary(tmp_path / "m")
    result = _loaded(folder).predict({"input": ROWS})
    positive = _booster(folder / "binary.json").predict(xgboost.DMatrix(ROWS))
    np.testing.assert_allclose(result["probabilities"], np.column_stack([1 - positive, positive]), rtol=1e-6)
    assert result["label"].tolist() == (positive > 0.5).astype(int).tolist() == [1, 1, 0, 0, 0, 0]


def test_sklearn_api_classifier_saved_natively(tmp_path: Path) -> None:
    classifier = xgboost.XGBClassifier(n_estimators=4, max_depth=2, n_jobs=1).fit(FEATURES, np.arange(150) // 50)
    folder = xgboost_classifier(tmp_path / "m")
    classifier.save_model(str(folder / "iris.ubj"))
    result = _loaded(folder).predict({"input": FEATURES})
    np.testing.assert_array_equal(result["label"], classifier.predict(FEATURES))
    np.testing.assert_allclose(result["probabilities"], classifier.predict_proba(FEATURES), rtol=1e-6)


def test_regressor(tmp_path: Path) -> None:
    folder = xgboost_regressor(tmp_path / "m")
    result = _loaded(folder).predict({"input": ROWS[:, :3]})
    np.testing.assert_allclose(result["width"], _booster(folder / "reg.json").predict(xgboost.DMatrix(ROWS[:, :3])))


def test_probabilities_of_a_regressor_are_refused(tmp_path: Path) -> None:
    folder = xgboost_regressor(tmp_path / "m")
    yaml = (folder / "serving.yaml").read_text().replace("name: width", "name: proba")
    (folder / "serving.yaml").write_text(yaml)
    with pytest.raises(ModelLoadError, match="output 'proba' asks for class probabilities, but an XGBoost model with"):
        _loaded(folder)


def test_signature_and_feature_count_mismatch(tmp_path: Path) -> None:
    folder = xgboost_classifier(tmp_path / "m")
    signature = signature_of(folder, load_serving_config(folder))
    assert [(s.name, s.shape) for s in signature.inputs] == [("input", [-1, 4])]
    assert [(s.name, s.shape) for s in signature.outputs] == [("label", [-1]), ("probabilities", [-1, 3])]
    yaml = (folder / "serving.yaml").read_text()
    (folder / "serving.yaml").write_text(yaml.replace("[-1, 4]", "[-1, 5]").replace("[-1, 3]", "[-1, 2]"))
    with pytest.raises(ModelLoadError) as error:
        _loaded(folder)
    assert str(error.value) == (
        "signature.inputs[0].shape: the XGBoost model says [-1, 4], serving.yaml says [-1, 5]; "
        "signature.outputs[1].shape: the XGBoost model says [-1, 3], serving.yaml says [-1, 2]"
    )


def test_bad_files_are_clear_load_errors(tmp_path: Path) -> None:
    folder = xgboost_classifier(tmp_path / "m")
    (folder / "iris.ubj").write_bytes(b"{not ubjson")
    with pytest.raises(ModelLoadError, match=r"cannot load iris\.ubj with xgboost"):
        _loaded(folder)
    # One line, not XGBoost's C++ backtrace ("Stack trace: [bt] (0) .../libxgboost.so(+0x11031e)" and 9 more).
    (folder / "iris.ubj").write_bytes(b"tree\nversion=v4\n")
    with pytest.raises(ModelLoadError) as error:
        _loaded(folder)
    assert "\n" not in str(error.value) and "libxgboost" not in str(error.value), str(error.value)
    assert str(error.value).startswith("cannot load iris.ubj with xgboost: Check failed:"), str(error.value)
    (folder / "iris.bin").write_bytes(b"")
    yaml = (folder / "serving.yaml").read_text().replace("iris.ubj", "iris.bin")
    (folder / "serving.yaml").write_text(yaml)
    with pytest.raises(ModelLoadError, match=r"^cannot load iris\.bin with xgboost: "):
        _loaded(folder)


@pytest.mark.parametrize(("saved", "served"), [("model.bst", "model.bst"), ("m.json", "model.bin"), ("m.ubj", "xgb")])
def test_a_model_file_of_any_name(tmp_path: Path, saved: str, served: str) -> None:
    # XGBoost's own docs save "model.bst"; XGBoost writes UBJSON for a name it does not know, and reads JSON or
    # UBJSON from the bytes alike. The runtime refused every name but .json and .ubj.
    classifier = xgboost.XGBClassifier(n_estimators=4, max_depth=2, n_jobs=1).fit(FEATURES, np.arange(150) // 50)
    folder = xgboost_classifier(tmp_path / "m")
    with pytest.warns(UserWarning) if saved == "model.bst" else contextlib.nullcontext():
        classifier.save_model(str(tmp_path / saved))
    (tmp_path / saved).replace(folder / served)
    (folder / "serving.yaml").write_text((folder / "serving.yaml").read_text().replace("iris.ubj", served))
    result = _loaded(folder).predict({"input": FEATURES})
    np.testing.assert_allclose(result["probabilities"], classifier.predict_proba(FEATURES), rtol=1e-6)


@pytest.mark.parametrize("objective", ["multi:softprob", "multi:softmax"])
async def test_an_empty_batch_has_empty_answers(tmp_path: Path, objective: str) -> None:
    # Multi-class probabilities of 0 rows came back 1-D from XGBoost, and argmax over axis 1 was a 500 (AxisError).
    folder = xgboost_classifier(tmp_path / "m", objective=objective)
    outputs = await serve_in_process(folder, {"input": np.zeros((0, 4), np.float32)})
    assert outputs["label"].shape == (0,) and outputs["probabilities"].shape == (0, 3)


def test_text_features_are_refused_at_load(tmp_path: Path) -> None:
    # Tree boosters take numbers: a BYTES feature matrix passed the signature check (and so registration) and only
    # the warm-up failed, with "could not convert string to float: b''".
    folder = xgboost_classifier(tmp_path / "m")
    yaml = (folder / "serving.yaml").read_text().replace("name: input, datatype: FP32", "name: input, datatype: BYTES")
    (folder / "serving.yaml").write_text(yaml)
    with pytest.raises(ModelLoadError) as error:
        _loaded(folder)
    assert str(error.value) == "signature.inputs[0].datatype: the XGBoost model says FP32, serving.yaml says BYTES"
