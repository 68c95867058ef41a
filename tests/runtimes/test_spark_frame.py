"""How the spark runtime turns a request into DataFrame rows, with stand-ins for PySpark (usually not installed).

``SparkRuntime._frame`` only calls ``createDataFrame(records, names)`` and, for [-1, n] inputs, ``Vectors.dense``;
both are imitated, so what reaches Spark can be checked where neither PySpark nor Java is.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtimes.errors import InvalidInput
from runtimes.serving_config import parse_serving_config
from runtimes.spark_model import SparkRuntime

SERVING_YAML = """\
runtime: spark
files: [pipeline]
signature:
  inputs:
    - {name: city, datatype: BYTES, shape: [-1]}
    - {name: size, datatype: FP64, shape: [-1]}
  outputs: [{name: prediction, datatype: FP64, shape: [-1]}]
"""


class _Session:
    def __init__(self) -> None:
        self.frames: list[tuple[list[tuple[Any, ...]], list[str]]] = []

    def createDataFrame(self, records: list[tuple[Any, ...]], names: list[str]) -> str:
        self.frames.append((records, names))
        return "frame"


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> tuple[SparkRuntime, _Session]:
    linalg = types.ModuleType("pyspark.ml.linalg")
    linalg.Vectors = types.SimpleNamespace(dense=lambda values: ("dense", list(values)))  # type: ignore[attr-defined]
    for name in ("pyspark", "pyspark.ml"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "pyspark.ml.linalg", linalg)
    spark = SparkRuntime(Path("."), parse_serving_config(SERVING_YAML))
    session = _Session()
    spark._spark = session
    return spark, session


def test_text_inputs_are_string_columns(runtime: tuple[SparkRuntime, _Session]) -> None:
    # BYTES elements went into the rows as bytes, which Spark makes a binary column: a StringIndexer (the usual
    # first stage for text features) refuses it, so such a pipeline failed its warm-up and every request.
    spark, session = runtime
    spark._frame({"city": np.array([b"paris", "k\u00f6ln".encode()], dtype=object), "size": np.array([1.0, 2.5])})
    records, names = session.frames[-1]
    assert names == ["city", "size"]
    assert records == [("paris", 1.0), ("k\u00f6ln", 2.5)]
    assert all(type(record[0]) is str for record in records)


def test_text_that_is_not_utf8_is_the_clients_error(runtime: tuple[SparkRuntime, _Session]) -> None:
    spark, _ = runtime
    with pytest.raises(InvalidInput, match=r"input 'city'.*not UTF-8"):
        spark._frame({"city": np.array([b"\xff"], dtype=object), "size": np.array([1.0])})
