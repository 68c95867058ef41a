"""Make the three models of the iris pipeline from the data set scikit-learn ships (no download).

``python train_pipeline.py [FOLDER]`` writes, under FOLDER (default: this folder), ``features/scaler.json``,
``classifier/model.joblib`` and ``scorer/scorer.onnx``. FOLDER must hold (or get) the three model folders.

The scorer is a small neural network (one hidden ReLU layer, softmax out) fitted with scikit-learn's
MLPClassifier and written as an ONNX graph by hand from its weights with the ``onnx`` package: no converter
(skl2onnx) is needed for five operators.
"""

from __future__ import annotations

import json
import runpy
import shutil
import sys
from pathlib import Path

import joblib
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier

HERE = Path(__file__).resolve().parent
STAGES = ("features", "classifier", "scorer")
#: What train() writes, by stage folder: a folder holding all three is trained.
TRAINED = ("features/scaler.json", "classifier/model.joblib", "scorer/scorer.onnx")


def copy_folders(folder: Path) -> None:
    """Copy the stages' serving.yaml (and the feature extractor's code) into ``folder``."""
    for stage in STAGES:
        (folder / stage).mkdir(parents=True, exist_ok=True)
        for source in (HERE / stage).iterdir():
            if source.suffix in (".yaml", ".py"):
                shutil.copy(source, folder / stage / source.name)


def train(folder: Path) -> Path:
    """Fit the scaler, the classifier and the scorer, and write them into the model folders under ``folder``."""
    if folder.resolve() != HERE:
        copy_folders(folder)
    measurements, labels = load_iris(return_X_y=True)
    raw_features = runpy.run_path(str(HERE / "features" / "model.py"))["raw_features"]
    raw = raw_features(measurements)
    mean, scale = raw.mean(axis=0), raw.std(axis=0)
    (folder / "features" / "scaler.json").write_text(json.dumps({"mean": mean.tolist(), "scale": scale.tolist()}))

    features = ((raw - mean) / scale).astype(np.float32)
    classifier = LogisticRegression(max_iter=1000).fit(features, labels)
    joblib.dump(classifier, folder / "classifier" / "model.joblib")

    probabilities = classifier.predict_proba(features).astype(np.float32)
    scorer = MLPClassifier(hidden_layer_sizes=(8,), activation="relu", max_iter=2000, random_state=0)
    scorer.fit(probabilities, labels)
    save_scorer(scorer, folder / "scorer" / "scorer.onnx")
    return folder


def is_trained(folder: Path) -> bool:
    """Whether ``folder`` holds every file train() writes."""
    return all((folder / name).exists() for name in TRAINED)


def save_scorer(scorer: MLPClassifier, path: Path) -> None:
    """The fitted network as an ONNX graph: probabilities FP32 [n, 3] -> species INT64 [n], species_proba FP32."""
    (w1, w2), (b1, b2) = scorer.coefs_, scorer.intercepts_
    weights = [
        numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)
        for array, name in ((w1, "W1"), (b1, "B1"), (w2, "W2"), (b2, "B2"))
    ]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["probabilities", "W1"], ["h1"]),
            helper.make_node("Add", ["h1", "B1"], ["z1"]),
            helper.make_node("Relu", ["z1"], ["a1"]),
            helper.make_node("MatMul", ["a1", "W2"], ["h2"]),
            helper.make_node("Add", ["h2", "B2"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["species_proba"], axis=1),
            helper.make_node("ArgMax", ["logits"], ["species"], axis=1, keepdims=0),
        ],
        "iris_scorer",
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
        [
            helper.make_tensor_value_info("species", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("species_proba", TensorProto.FLOAT, ["batch", 3]),
        ],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    # An IR version that the onnxruntime releases of the last years all read.
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


if __name__ == "__main__":
    print(train(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE))
