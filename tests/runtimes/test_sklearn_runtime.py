"""The sklearn runtime in process: answers equal the estimator's own, and missing values are judged per estimator."""

from __future__ import annotations

from pathlib import Path

import joblib
import numpy as np
import pytest
import sklearn
from framework_models import CLASSES, FEATURES, ROWS, TABULAR_YAML, serve_in_process, sklearn_classifier
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder

from runtimes.base import create_runtime
from runtimes.errors import InvalidInput, ModelLoadError
from runtimes.serving_config import ServingConfigError, load_serving_config, parse_serving_config


async def test_answers_equal_the_estimators_own(tmp_path: Path) -> None:
    folder = sklearn_classifier(tmp_path / "m")
    model = joblib.load(folder / "model.joblib")
    outputs = await serve_in_process(folder, {"input": ROWS})
    np.testing.assert_allclose(outputs["probabilities"], model.predict_proba(ROWS), rtol=1e-6)
    np.testing.assert_array_equal(outputs["label"], model.predict(ROWS))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
async def test_non_finite_input_is_the_clients_error(tmp_path: Path, bad: float) -> None:
    # LogisticRegression takes no missing values: a 400 naming the input, not a 500 from inside sklearn.
    rows = ROWS.copy()
    rows[1, 2] = bad
    with pytest.raises(InvalidInput, match=r"input 'input' contains NaN or infinity.*LogisticRegression"):
        await serve_in_process(sklearn_classifier(tmp_path / "m"), {"input": rows})


async def test_estimators_that_take_missing_values_get_them(tmp_path: Path) -> None:
    folder = tmp_path / "hgb"
    folder.mkdir()
    model = HistGradientBoostingClassifier(max_iter=20).fit(FEATURES, CLASSES)
    joblib.dump(model, folder / "model.joblib")
    (folder / "serving.yaml").write_text(TABULAR_YAML.format(runtime="sklearn", file="model.joblib", features=4))
    rows = ROWS.copy()
    rows[0, 0] = np.nan
    outputs = await serve_in_process(folder, {"input": rows})
    np.testing.assert_array_equal(outputs["label"], model.predict(rows))


@pytest.mark.parametrize("assumed", [False, True])
def test_predict_leaves_sklearn_settings_as_they_were(tmp_path: Path, assumed: bool) -> None:
    # predict skips sklearn's own finiteness check (numpy made it) only for its own call.
    folder = sklearn_classifier(tmp_path / "m")
    runtime = create_runtime(folder, load_serving_config(folder))
    runtime.load()
    with sklearn.config_context(assume_finite=assumed):
        outputs = runtime.predict({"input": ROWS})
        assert sklearn.get_config()["assume_finite"] is assumed
    np.testing.assert_array_equal(outputs["label"], joblib.load(folder / "model.joblib").predict(ROWS))


CATEGORICAL_YAML = """\
runtime: sklearn
files: [model.joblib]
signature:
  inputs: [{name: x, datatype: BYTES, shape: [-1, 2]}]
  outputs: [{name: label, datatype: INT64, shape: [-1]}]
"""


async def test_bytes_inputs_reach_the_estimator_as_text(tmp_path: Path) -> None:
    # Estimators fitted on strings (the usual case: pandas, CSV) compare categories as str; handed the wire's bytes,
    # a OneHotEncoder that ignores unknown categories saw every row as unknown and every answer was the same.
    rows = np.array([["red", "s"], ["blue", "m"], ["green", "l"], ["red", "l"]], dtype=object)
    model = make_pipeline(OneHotEncoder(handle_unknown="ignore"), LogisticRegression()).fit(rows, [0, 1, 1, 0])
    (tmp_path / "m").mkdir()
    joblib.dump(model, tmp_path / "m" / "model.joblib")
    (tmp_path / "m" / "serving.yaml").write_text(CATEGORICAL_YAML)
    wire = np.array([[value.encode() for value in row] for row in rows], dtype=object)
    outputs = await serve_in_process(tmp_path / "m", {"x": wire})
    np.testing.assert_array_equal(outputs["label"], model.predict(rows))
    # Bytes that are not UTF-8 are no text: the client's mistake, named, not a wrong answer or a 500.
    with pytest.raises(InvalidInput, match=r"input 'x'.*not UTF-8"):
        await serve_in_process(tmp_path / "m", {"x": np.array([[b"\xff", b"s"]], dtype=object)})


async def test_an_empty_batch_has_empty_answers(tmp_path: Path) -> None:
    # [0, 4] is a valid tensor (a filter stage of a pipeline can leave no rows); sklearn refuses 0 samples, which
    # was a 500 "Found array with 0 sample(s)".
    outputs = await serve_in_process(sklearn_classifier(tmp_path / "m"), {"input": np.zeros((0, 4), np.float32)})
    assert outputs["label"].shape == (0,) and outputs["label"].dtype == np.int64
    assert outputs["probabilities"].shape == (0, 3) and outputs["probabilities"].dtype == np.float32


async def test_text_pipelines_take_one_dimensional_text(tmp_path: Path) -> None:
    # A vectorizer takes one document per row ([-1]) and knows no n_features_in_; the signature check demanded a
    # 2-D feature matrix of the unknown width ([-1, -1]), so the classic text classifier could not be served.
    texts = ["good movie", "bad movie", "great film", "awful film"]
    model = make_pipeline(TfidfVectorizer(), LogisticRegression()).fit(texts, [1, 0, 1, 0])
    (tmp_path / "m").mkdir()
    joblib.dump(model, tmp_path / "m" / "model.joblib")
    yaml = CATEGORICAL_YAML.replace("shape: [-1, 2]", "shape: [-1]")
    (tmp_path / "m" / "serving.yaml").write_text(yaml)
    wire = np.array([text.encode() for text in texts], dtype=object)
    outputs = await serve_in_process(tmp_path / "m", {"x": wire})
    np.testing.assert_array_equal(outputs["label"], model.predict(texts))


async def test_a_model_that_refuses_zeros_loads_with_the_warmup_request_of_its_serving_yaml(tmp_path: Path) -> None:
    # OneHotEncoder's default refuses a category it was not fitted on, and the warm-up on zeros sends "": such a
    # model could not get ready. serving.yaml's warmup gives the runtime a request it accepts.
    rows = np.array([["red", "s"], ["blue", "m"], ["green", "l"], ["red", "l"]], dtype=object)
    model = make_pipeline(OneHotEncoder(), LogisticRegression()).fit(rows, [0, 1, 1, 0])
    folder = tmp_path / "m"
    folder.mkdir()
    joblib.dump(model, folder / "model.joblib")
    (folder / "serving.yaml").write_text(CATEGORICAL_YAML)
    wire = np.array([[value.encode() for value in row] for row in rows], dtype=object)
    with pytest.raises(ModelLoadError, match=r"warm-up prediction on zeros .*`warmup:`.*Found unknown categories"):
        await serve_in_process(folder, {"x": wire})

    (folder / "serving.yaml").write_text(CATEGORICAL_YAML + "warmup:\n  x: {shape: [1, 2], data: [red, s]}\n")
    outputs = await serve_in_process(folder, {"x": wire})
    np.testing.assert_array_equal(outputs["label"], model.predict(rows))

    # A warm-up request that does not fit the signature is named as such, not as the model's failure.
    (folder / "serving.yaml").write_text(CATEGORICAL_YAML + "warmup:\n  x: {shape: [1, 3], data: [red, s, m]}\n")
    with pytest.raises(ModelLoadError, match=r"serving.yaml warmup: input 'x' has shape \[1, 3\]"):
        await serve_in_process(folder, {"x": wire})


def test_a_warmup_must_give_every_input_and_no_other() -> None:
    x, y = "x: {shape: [1, 2], data: [a, b]}", "y: {shape: [1], data: [1]}"
    for warmup in ("{}", f"{{{y}}}", f"{{{x}, {y}}}"):
        with pytest.raises(ServingConfigError, match=r"warmup.*every signature input once \(x\)"):
            parse_serving_config(CATEGORICAL_YAML + f"warmup: {warmup}\n")
    with pytest.raises(ServingConfigError, match=r"warmup\.x\.shape"):
        parse_serving_config(CATEGORICAL_YAML + "warmup: {x: {data: [a, b]}}\n")


async def test_a_warmup_request_the_model_refuses_as_input_is_a_load_error(tmp_path: Path) -> None:
    # The runtime judges NaN the client's mistake (InvalidInput); in serving.yaml's warmup it escaped the warm-up
    # as that, and the runtime process logged a traceback ("loading failed") instead of one line naming warmup.
    folder = sklearn_classifier(tmp_path / "m")
    yaml = (folder / "serving.yaml").read_text()
    (folder / "serving.yaml").write_text(yaml + "warmup:\n  input: {shape: [1, 4], data: [.nan, 1, 2, 3]}\n")
    with pytest.raises(ModelLoadError, match=r"^serving.yaml warmup: input 'input' contains NaN or infinity"):
        await serve_in_process(folder, {"input": ROWS})
