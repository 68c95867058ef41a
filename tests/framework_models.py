"""Small models of every framework, made on the spot (no downloads), each with its model folder and serving.yaml.

Shared by the in-process runtime tests, the manager's signature tests and the end-to-end framework test. Trained
on iris, so a model folder's answers can be checked against the framework's own predictions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sklearn.datasets import load_iris

_IRIS = load_iris()
#: Iris features (FP32: what ONNX graphs and tree libraries compute in) and classes.
FEATURES = _IRIS.data.astype(np.float32)
CLASSES = _IRIS.target
#: A few rows of every class, for requests.
ROWS = FEATURES[[0, 1, 50, 51, 100, 120]]

#: serving.yaml of a tabular iris classifier; {runtime}, {file} and {features} (the input's width) filled in.
TABULAR_YAML = """\
runtime: {runtime}
files: [{file}]
signature:
  inputs:
    - {{name: input, datatype: FP32, shape: [-1, {features}]}}
  outputs:
    - {{name: label, datatype: INT64, shape: [-1]}}
    - {{name: probabilities, datatype: FP32, shape: [-1, 3]}}
"""

ONNX_LINEAR_YAML = """\
runtime: onnx
files: [linear.onnx]
signature:
  inputs:
    - {{name: x, datatype: FP32, shape: [-1, {features}]}}
  outputs:
    - {{name: y, datatype: FP32, shape: [-1, 3]}}
"""

_RNG = np.random.default_rng(7)
#: Weights of the linear ONNX graph: y = x @ W + b.
LINEAR_W = _RNG.normal(size=(4, 3)).astype(np.float32)
LINEAR_B = _RNG.normal(size=3).astype(np.float32)


def _save_onnx(graph: Any, path: Path) -> None:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    # The IR version onnxruntime releases of the last years all read.
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def onnx_linear(folder: Path, features: int = 4) -> Path:
    """A MatMul+Add graph: x FP32 [batch, 4] → y FP32 [batch, 3]; ``features`` only changes serving.yaml."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(LINEAR_W, "W"), numpy_helper.from_array(LINEAR_B, "b")],
    )
    folder.mkdir(parents=True, exist_ok=True)
    _save_onnx(graph, folder / "linear.onnx")
    (folder / "serving.yaml").write_text(ONNX_LINEAR_YAML.format(features=features))
    return folder


def _softmax_weights() -> tuple[np.ndarray, np.ndarray]:
    """A multinomial logistic regression fitted to iris, as weights for an ONNX graph."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=500).fit(FEATURES, CLASSES)
    return model.coef_.T.astype(np.float32), model.intercept_.astype(np.float32)


def onnx_classifier(folder: Path, features: int = 4) -> Path:
    """A classifier-like graph: input [batch, 4] → probabilities (Softmax) FP32 [batch, 3], label (ArgMax) INT64."""
    from onnx import TensorProto, helper, numpy_helper

    weights, bias = _softmax_weights()
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
            helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
        ],
        "iris",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3]),
        ],
        [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")],
    )
    folder.mkdir(parents=True, exist_ok=True)
    _save_onnx(graph, folder / "iris.onnx")
    (folder / "serving.yaml").write_text(TABULAR_YAML.format(runtime="onnx", file="iris.onnx", features=features))
    return folder


def xgboost_classifier(folder: Path, file: str = "iris.ubj", objective: str = "multi:softprob") -> Path:
    """An XGBoost Booster on iris (3 classes), saved natively (.ubj or .json by ``file``)."""
    import xgboost

    params = {"objective": objective, "num_class": 3, "max_depth": 2, "eta": 0.5, "nthread": 1}
    booster = xgboost.train(params, xgboost.DMatrix(FEATURES, label=CLASSES), num_boost_round=5)
    folder.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(folder / file))
    (folder / "serving.yaml").write_text(TABULAR_YAML.format(runtime="xgboost", file=file, features=4))
    return folder


def xgboost_binary(folder: Path) -> Path:
    """An XGBoost binary:logistic Booster (setosa or not), probabilities [-1, 2]."""
    import xgboost

    params = {"objective": "binary:logistic", "max_depth": 2, "nthread": 1}
    booster = xgboost.train(params, xgboost.DMatrix(FEATURES, label=CLASSES == 0), num_boost_round=3)
    folder.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(folder / "binary.json"))
    yaml = TABULAR_YAML.format(runtime="xgboost", file="binary.json", features=4).replace("[-1, 3]", "[-1, 2]")
    (folder / "serving.yaml").write_text(yaml)
    return folder


def xgboost_regressor(folder: Path) -> Path:
    """An XGBoost regressor (petal width from the other three features): one output, the value."""
    import xgboost

    params = {"objective": "reg:squarederror", "max_depth": 2, "nthread": 1}
    booster = xgboost.train(params, xgboost.DMatrix(FEATURES[:, :3], label=FEATURES[:, 3]), num_boost_round=3)
    folder.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(folder / "reg.json"))
    (folder / "serving.yaml").write_text(
        "runtime: xgboost\nfiles: [reg.json]\nsignature:\n"
        "  inputs: [{name: input, datatype: FP32, shape: [-1, 3]}]\n"
        "  outputs: [{name: width, datatype: FP32, shape: [-1]}]\n"
    )
    return folder


def lightgbm_classifier(folder: Path, objective: str = "multiclass") -> Path:
    """A LightGBM Booster on iris (3 classes), saved as its model text file."""
    import lightgbm

    params = {"objective": objective, "num_class": 3, "num_leaves": 4, "min_data_in_leaf": 5, "verbose": -1}
    booster = lightgbm.train(params, lightgbm.Dataset(FEATURES, label=CLASSES), num_boost_round=5)
    folder.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(folder / "iris.txt"))
    (folder / "serving.yaml").write_text(TABULAR_YAML.format(runtime="lightgbm", file="iris.txt", features=4))
    return folder


def lightgbm_binary(folder: Path) -> Path:
    """A LightGBM binary Booster (setosa or not), probabilities [-1, 2]."""
    import lightgbm

    params = {"objective": "binary", "num_leaves": 4, "min_data_in_leaf": 5, "verbose": -1}
    booster = lightgbm.train(params, lightgbm.Dataset(FEATURES, label=CLASSES == 0), num_boost_round=3)
    folder.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(folder / "binary.txt"))
    yaml = TABULAR_YAML.format(runtime="lightgbm", file="binary.txt", features=4).replace("[-1, 3]", "[-1, 2]")
    (folder / "serving.yaml").write_text(yaml)
    return folder


def sklearn_classifier(folder: Path, features: int = 4) -> Path:
    """A joblib-saved scikit-learn LogisticRegression on iris."""
    import joblib
    from sklearn.linear_model import LogisticRegression

    folder.mkdir(parents=True, exist_ok=True)
    joblib.dump(LogisticRegression(max_iter=500).fit(FEATURES, CLASSES), folder / "model.joblib")
    yaml = TABULAR_YAML.format(runtime="sklearn", file="model.joblib", features=features)
    (folder / "serving.yaml").write_text(yaml)
    return folder


async def serve_in_process(folder: Path, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Load ``folder`` with its runtime behind a DataPlane (validation, warm-up, output casts) and infer once."""
    from runtimes.base import create_runtime
    from runtimes.dataplane import DataPlane, array_inputs
    from runtimes.messages import InferRequest
    from runtimes.serving_config import load_serving_config

    config = load_serving_config(folder)
    plane = DataPlane(create_runtime(folder, config), name="m", version=1)
    try:
        await plane.load()
        response = await plane.infer(InferRequest("m", "", array_inputs(arrays, config.signature)))
    finally:
        plane.shutdown_executor()
    return {output.name: output.data for output in response.outputs}


#: A plain python model: FP32 ``x`` of any length in, the same values out as ``y``.
IDENTITY_YAML = """\
runtime: python
files: [model.py]
entrypoint: model:predict
signature:
  inputs: [{name: x, datatype: FP32, shape: [-1]}]
  outputs: [{name: y, datatype: FP32, shape: [-1]}]
"""
IDENTITY_PY = "def predict(inputs):\n    return {'y': inputs['x']}\n"


def python_identity(folder: Path) -> Path:
    """The python identity model's folder (IDENTITY_YAML, IDENTITY_PY) written into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(IDENTITY_PY)
    (folder / "serving.yaml").write_text(IDENTITY_YAML)
    return folder
