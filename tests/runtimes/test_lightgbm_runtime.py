"""The lightgbm runtime in process: Boosters trained on iris, answers compared with LightGBM's own predictions."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightgbm
import numpy as np
import pytest
from framework_models import FEATURES, ROWS, lightgbm_binary, lightgbm_classifier, serve_in_process

from runtimes.base import create_runtime
from runtimes.errors import ModelLoadError
from runtimes.lightgbm_model import LightGBMRuntime, signature_of
from runtimes.serving_config import load_serving_config


def _loaded(folder: Path) -> LightGBMRuntime:
    runtime = create_runtime(folder, load_serving_config(folder))
    assert isinstance(runtime, LightGBMRuntime)
    runtime.load()
    return runtime


@pytest.mark.parametrize("objective", ["multiclass", "multiclassova"])
async def test_multiclass(tmp_path: Path, objective: str) -> None:
    folder = lightgbm_classifier(tmp_path / "m", objective=objective)
    outputs = await serve_in_process(folder, {"input": ROWS})
    own = lightgbm.Booster(model_file=str(folder / "iris.txt")).predict(ROWS)
    np.testing.assert_allclose(outputs["probabilities"], own, rtol=1e-6)
    np.testing.assert_array_equal(outputs["label"], np.argmax(own, axis=1))
    assert outputs["label"].tolist() == [0, 0, 1, 1, 2, 2]


def test_binary_probabilities_have_a_column_per_class(tmp_path: Path) -> None:
    folder = lightgbm_binary(tmp_path / "m")
    result = _loaded(folder).predict({"input": ROWS})
    positive = np.asarray(lightgbm.Booster(model_file=str(folder / "binary.txt")).predict(ROWS))
    np.testing.assert_allclose(result["probabilities"], np.column_stack([1 - positive, positive]), rtol=1e-6)
    assert result["label"].tolist() == [1, 1, 0, 0, 0, 0]


def test_regressor(tmp_path: Path) -> None:
    booster = lightgbm.train(
        {"objective": "regression", "num_leaves": 4, "verbose": -1},
        lightgbm.Dataset(np.ascontiguousarray(FEATURES[:, :3]), label=FEATURES[:, 3].copy()),
        num_boost_round=3,
    )
    folder = tmp_path / "m"
    folder.mkdir()
    booster.save_model(str(folder / "reg.txt"))
    (folder / "serving.yaml").write_text(
        "runtime: lightgbm\nfiles: [reg.txt]\nsignature:\n"
        "  inputs: [{name: input, datatype: FP64, shape: [-1, 3]}]\n"
        "  outputs: [{name: width, datatype: FP64, shape: [-1]}]\n"
    )
    rows = np.ascontiguousarray(ROWS[:, :3], dtype=np.float64)
    np.testing.assert_allclose(_loaded(folder).predict({"input": rows})["width"], booster.predict(rows))
    (folder / "serving.yaml").write_text((folder / "serving.yaml").read_text().replace("width", "probability"))
    with pytest.raises(ModelLoadError, match="a LightGBM model with objective regression is no classifier"):
        _loaded(folder)


def test_concurrent_predictions_agree(tmp_path: Path) -> None:
    runtime = _loaded(lightgbm_classifier(tmp_path / "m"))
    expected = runtime.predict({"input": FEATURES})["probabilities"]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: runtime.predict({"input": FEATURES})["probabilities"], range(16)))
    for result in results:
        np.testing.assert_array_equal(result, expected)


def test_signature_and_mismatch(tmp_path: Path) -> None:
    folder = lightgbm_classifier(tmp_path / "m")
    signature = signature_of(folder, load_serving_config(folder))
    assert [(s.name, s.shape) for s in signature.inputs] == [("input", [-1, 4])]
    assert [(s.name, s.shape) for s in signature.outputs] == [("label", [-1]), ("probabilities", [-1, 3])]
    (folder / "serving.yaml").write_text((folder / "serving.yaml").read_text().replace("[-1, 4]", "[-1, -1]"))
    with pytest.raises(ModelLoadError) as error:
        _loaded(folder)
    assert str(error.value) == "signature.inputs[0].shape: the LightGBM model says [-1, 4], serving.yaml says [-1, -1]"


@pytest.mark.parametrize("content", [b"", b"tree\nversion=v4\nnot a model", b"\x00\xff" * 10])
def test_bad_file_is_a_clear_load_error(tmp_path: Path, content: bytes) -> None:
    folder = lightgbm_classifier(tmp_path / "m")
    (folder / "iris.txt").write_bytes(content)
    with pytest.raises(ModelLoadError, match=r"cannot load iris\.txt with lightgbm"):
        _loaded(folder)


def test_text_features_are_refused_at_load(tmp_path: Path) -> None:
    # LightGBM takes numbers: a BYTES feature matrix passed the signature check (and so registration) and only the
    # warm-up failed, with "could not convert string to float: b''".
    folder = lightgbm_classifier(tmp_path / "m")
    yaml = (folder / "serving.yaml").read_text().replace("name: input, datatype: FP32", "name: input, datatype: BYTES")
    (folder / "serving.yaml").write_text(yaml)
    with pytest.raises(ModelLoadError) as error:
        _loaded(folder)
    assert str(error.value) == "signature.inputs[0].datatype: the LightGBM model says FP64, serving.yaml says BYTES"
