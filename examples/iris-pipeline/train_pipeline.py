"""Make the three models of the iris pipeline from the data set scikit-learn ships (no download).

``python train_pipeline.py [FOLDER]`` writes, under FOLDER (default: this folder), ``features/scaler.json``,
``classifier/model.joblib`` and ``scorer/scorer.json``. FOLDER must hold (or get) the three model folders.
"""

from __future__ import annotations

import json
import runpy
import shutil
import sys
from pathlib import Path

import joblib
import numpy as np
import xgboost
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

HERE = Path(__file__).resolve().parent
STAGES = ("features", "classifier", "scorer")


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
    params = {"objective": "multi:softprob", "num_class": 3, "max_depth": 2, "eta": 0.5, "nthread": 1}
    scorer = xgboost.train(params, xgboost.DMatrix(probabilities, label=labels), num_boost_round=10)
    scorer.save_model(str(folder / "scorer" / "scorer.json"))
    return folder


if __name__ == "__main__":
    print(train(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE))
