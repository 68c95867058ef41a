"""The interface every framework module implements, and the registry from runtime kind to implementation.

A runtime loads one model folder and answers ``predict`` with numpy arrays. ``load`` and ``predict`` are plain
blocking calls: the data plane runs them on worker threads, so frameworks need no asyncio and CPU-heavy
predictions never stall the event loop that serves both protocols.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from runtimes.serving_config import RUNTIME_KINDS, ServingConfig


class ModelRuntime(ABC):
    """One loaded model. ``predict`` may be called from several threads at once."""

    #: The ``runtime:`` value of serving.yaml this class serves; also reported as the model's platform.
    kind: ClassVar[str]
    #: Requests of at most this many rows (first dimension) may be predicted on the event loop when the data plane
    #: has measured them to be cheap; 0 (user code, whose cost can depend on the data) always uses worker threads.
    inline_rows: ClassVar[int] = 0

    def __init__(self, model_dir: Path, config: ServingConfig) -> None:
        self.model_dir = model_dir
        self.config = config

    @abstractmethod
    def load(self) -> None:
        """Load the model from ``model_dir``; raise ModelLoadError (or anything) naming what is wrong."""

    @abstractmethod
    def predict(self, inputs: dict[str, np.ndarray]) -> Mapping[str, Any]:
        """Map input name to array (already validated against the signature) to output name to array-like."""


# Imported lazily so that a python-runtime process never pays for importing scikit-learn, and so that adding a
# framework with heavy dependencies costs nothing to the others.
_REGISTRY: dict[str, str] = {
    "python": "runtimes.python_model:PythonModelRuntime",
    "sklearn": "runtimes.sklearn_model:SklearnRuntime",
    "onnx": "runtimes.onnx_model:OnnxRuntime",
    "xgboost": "runtimes.xgboost_model:XGBoostRuntime",
    "lightgbm": "runtimes.lightgbm_model:LightGBMRuntime",
    "tensorflow": "runtimes.tensorflow_model:TensorFlowRuntime",
    "spark": "runtimes.spark_model:SparkRuntime",
}
_LOADED: dict[str, type[ModelRuntime]] = {}


def register_runtime(kind: str, runtime: type[ModelRuntime]) -> None:
    """Make ``runtime`` the implementation of ``kind`` (used by tests and future framework modules)."""
    _LOADED[kind] = runtime


def runtime_class(kind: str) -> type[ModelRuntime]:
    """The ModelRuntime subclass serving ``kind``; KeyError naming the known kinds if there is none."""
    if kind in _LOADED:
        return _LOADED[kind]
    if kind not in _REGISTRY:
        known = ", ".join(sorted(set(_REGISTRY) | set(_LOADED)))
        raise KeyError(f"no runtime for kind {kind!r}; known kinds: {known}")
    module_name, _, attribute = _REGISTRY[kind].partition(":")
    runtime = getattr(importlib.import_module(module_name), attribute)
    if not (isinstance(runtime, type) and issubclass(runtime, ModelRuntime)):
        raise TypeError(f"{_REGISTRY[kind]} is not a ModelRuntime")
    _LOADED[kind] = runtime
    return runtime


def create_runtime(model_dir: Path, config: ServingConfig) -> ModelRuntime:
    """An unloaded runtime for the model folder ``model_dir`` described by ``config``."""
    return runtime_class(config.runtime)(model_dir, config)


def registered_kinds() -> tuple[str, ...]:
    """Runtime kinds with an implementation (at least every kind serving.yaml accepts)."""
    return tuple(sorted(set(_REGISTRY) | set(_LOADED) | set(RUNTIME_KINDS)))
