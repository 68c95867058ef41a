"""The ``spark`` runtime (optional extra ``hydro-serving[spark]``): a Spark ML model in a local-mode session.

The first entry of ``files`` is the folder written by ``model.save(path)`` (a ``PipelineModel`` or a single fitted
model; the metadata says which class to load). Each request becomes a DataFrame with one column per input, named
after it: a [-1] input is a scalar column, a [-1, n] input a vector column (so a model trained on a "features"
column takes an input named "features"). Outputs map to columns of the transformed DataFrame: an output whose name
is a column is that column, otherwise names containing "proba" are the ``probability`` column and the others the
``prediction`` column.

PySpark and a JVM start only when such a model is loaded. Spark adds milliseconds of planning to every request;
it suits models that exist only as Spark pipelines. Without the extra, loading says how to install it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from runtimes.base import ModelRuntime
from runtimes.errors import ModelLoadError
from runtimes.serving_config import ServingConfig
from runtimes.tensors import text_array


def _pyspark() -> Any:
    try:
        import pyspark
    except ImportError as exc:
        raise ModelLoadError("the spark runtime needs PySpark and Java: pip install 'hydro-serving[spark]'") from exc
    return pyspark


def _model_class(path: Path) -> str:
    metadata = path / "metadata"
    parts = sorted(metadata.glob("part-*")) if metadata.is_dir() else []
    if not parts:
        raise ModelLoadError(f"{path.name} is not a saved Spark ML model (no metadata/part-* file)")
    try:
        return str(json.loads(parts[0].read_text().splitlines()[0])["class"])
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise ModelLoadError(f"{path.name}: unreadable Spark ML metadata: {exc}") from exc


def _column_for(output: str, columns: list[str]) -> str:
    if output in columns:
        return output
    return "probability" if "proba" in output.lower() else "prediction"


class SparkRuntime(ModelRuntime):
    """Serves a saved Spark ML model through a local SparkSession."""

    kind: ClassVar[str] = "spark"

    def __init__(self, model_dir: Path, config: ServingConfig) -> None:
        super().__init__(model_dir, config)
        self._model: Any = None
        self._spark: Any = None
        # One SparkSession plans one job at a time well; concurrent tiny jobs only contend in the JVM.
        self._lock = threading.Lock()

    def load(self) -> None:
        """Start a local SparkSession and load the saved model with the class its metadata names."""
        _pyspark()
        import importlib

        from pyspark.sql import SparkSession

        if not self.config.files:
            raise ModelLoadError("the spark runtime needs the saved model folder as the first entry of 'files'")
        path = self.model_dir / self.config.files[0]
        class_name = _model_class(path)
        module_name, _, attribute = class_name.rpartition(".")
        try:
            model_class = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            raise ModelLoadError(f"{self.config.files[0]}: PySpark has no model class {class_name}") from exc
        self._spark = (
            SparkSession.builder.master("local[1]")
            .appName(f"hydro-{self.model_dir.name}")
            .config("spark.ui.enabled", "false")
            .config("spark.sql.shuffle.partitions", "1")
            .getOrCreate()
        )
        try:
            self._model = model_class.load(str(path))
        except Exception as exc:
            raise ModelLoadError(f"cannot load {self.config.files[0]} as {class_name}: {exc}") from exc

    def _frame(self, inputs: dict[str, np.ndarray]) -> Any:
        from pyspark.ml.linalg import Vectors

        names = [spec.name for spec in self.config.signature.inputs]
        rows = len(inputs[names[0]])
        columns = []
        for name in names:
            array = inputs[name]
            if array.dtype.kind == "O":
                # BYTES arrive as bytes, which Spark would make a binary column (and a numpy object array has no
                # .item() per element): Spark ML's text stages (StringIndexer, Tokenizer) take string columns.
                array = text_array(name, array)
            if array.ndim == 1:
                # tolist(): Python scalars, which createDataFrame infers column types from (numpy's it refuses).
                columns.append(array.tolist())
            else:
                columns.append([Vectors.dense(row.reshape(-1).astype(np.float64)) for row in array])
        records = [tuple(column[i] for column in columns) for i in range(rows)]
        return self._spark.createDataFrame(records, names)

    def predict(self, inputs: dict[str, np.ndarray]) -> Mapping[str, Any]:
        """Transform a DataFrame of the inputs and collect the output columns."""
        if self._model is None:
            raise RuntimeError("the model is not loaded")
        with self._lock:
            result = self._model.transform(self._frame(inputs))
            wanted = {spec.name: _column_for(spec.name, result.columns) for spec in self.config.signature.outputs}
            rows = result.select(*sorted(set(wanted.values()))).collect()
        outputs: dict[str, Any] = {}
        for output, column in wanted.items():
            values = [row[column] for row in rows]
            outputs[output] = np.array([v.toArray() if hasattr(v, "toArray") else v for v in values])
        return outputs
