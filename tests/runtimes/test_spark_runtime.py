"""The spark runtime (optional extra): a Spark ML logistic regression trained in local mode, served in process.

Skipped unless PySpark is installed (``pip install -e '.[spark]'``) and Java is on the PATH. The JVM that
PySpark starts is stopped at the end of the module, so the session's leak check stays clean.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from framework_models import CLASSES, FEATURES, ROWS

from runtimes.base import create_runtime
from runtimes.errors import ModelLoadError
from runtimes.serving_config import load_serving_config
from runtimes.spark_model import SparkRuntime

pytest.importorskip("pyspark", reason="the spark extra is not installed (pip install -e '.[spark]')")
if shutil.which("java") is None:
    pytest.skip("PySpark needs Java on the PATH", allow_module_level=True)

SERVING_YAML = """\
runtime: spark
files: [lr]
signature:
  inputs: [{name: features, datatype: FP64, shape: [-1, 4]}]
  outputs:
    - {name: prediction, datatype: INT64, shape: [-1]}
    - {name: probabilities, datatype: FP64, shape: [-1, 3]}
"""


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[1]")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "1")
        .getOrCreate()
    )
    gateway = session.sparkContext._gateway
    try:
        yield session
    finally:
        from pyspark import SparkContext

        session.stop()
        # stop() leaves the py4j gateway's JVM running until the interpreter exits; the leak check runs earlier.
        gateway.shutdown()
        gateway.proc.kill()
        gateway.proc.wait()
        SparkContext._gateway = None
        SparkContext._jvm = None


@pytest.fixture(scope="module")
def model_dir(spark: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.linalg import Vectors

    rows = [(Vectors.dense(f.astype(float)), float(c)) for f, c in zip(FEATURES, CLASSES, strict=True)]
    model = LogisticRegression(maxIter=50).fit(spark.createDataFrame(rows, ["features", "label"]))
    folder = tmp_path_factory.mktemp("spark")
    model.save(str(folder / "lr"))
    (folder / "serving.yaml").write_text(SERVING_YAML)
    return folder, model


def test_spark_model_predicts_like_spark(spark: Any, model_dir: tuple[Path, Any]) -> None:
    from pyspark.ml.linalg import Vectors

    folder, model = model_dir
    runtime = create_runtime(folder, load_serving_config(folder))
    assert isinstance(runtime, SparkRuntime)
    runtime.load()
    result = runtime.predict({"features": ROWS.astype(np.float64)})
    frame = spark.createDataFrame([(Vectors.dense(r.astype(float)),) for r in ROWS], ["features"])
    own = model.transform(frame).collect()
    np.testing.assert_array_equal(result["prediction"], [row["prediction"] for row in own])
    np.testing.assert_allclose(result["probabilities"], [row["probability"].toArray() for row in own])


def test_not_a_spark_model(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    (folder / "lr").mkdir(parents=True)
    (folder / "serving.yaml").write_text(SERVING_YAML)
    with pytest.raises(ModelLoadError, match="is not a saved Spark ML model"):
        create_runtime(folder, load_serving_config(folder)).load()
