"""Train the demo iris classifier from the data set that scikit-learn ships (no download) and save it."""

from __future__ import annotations

import sys
from pathlib import Path

import joblib
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

MODEL_FILE = "model.joblib"


def train(folder: Path) -> Path:
    """Fit a logistic regression on iris and write it to ``folder/model.joblib``."""
    features, labels = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=1000).fit(features, labels)
    path = folder / MODEL_FILE
    joblib.dump(model, path)
    return path


if __name__ == "__main__":
    print(train(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent))
