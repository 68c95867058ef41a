"""The ``python`` runtime: a model written as plain Python in the model folder.

``entrypoint: module:attribute`` names either a class (instantiated with no arguments; its optional ``load()`` is
called once; its ``predict(inputs)`` answers requests) or a function ``predict(inputs)``. ``inputs`` maps each
input name to a numpy array; the result maps output names to arrays (or anything numpy can turn into one).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from runtimes.base import ModelRuntime
from runtimes.errors import ModelLoadError
from runtimes.serving_config import ServingConfig

log = logging.getLogger(__name__)

PredictFn = Callable[[dict[str, np.ndarray]], Mapping[str, Any]]


def _module_file(model_dir: Path, module: str) -> Path | None:
    relative = Path(*module.split("."))
    for candidate in (model_dir / relative.with_suffix(".py"), model_dir / relative / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def import_from_folder(model_dir: Path, module: str) -> ModuleType:
    """Import ``module`` from ``model_dir``, preferring the folder's file over an installed module of that name."""
    folder = str(model_dir.resolve())
    # The folder goes on sys.path so that the model's own modules can import each other.
    if folder not in sys.path:
        sys.path.insert(0, folder)
    path = _module_file(model_dir, module)
    if path is None or "." in module:
        return importlib.import_module(module)
    existing = sys.modules.get(module)
    if existing is not None:
        if getattr(existing, "__file__", None) == str(path):
            return existing
        # Replacing e.g. the json or types module the runtime itself uses would break it in obscure ways.
        raise ModelLoadError(f"the model's module {module!r} has the name of a module already in use; rename it")
    spec = importlib.util.spec_from_file_location(
        module, path, submodule_search_locations=[str(path.parent)] if path.name == "__init__.py" else None
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[module] = loaded
    try:
        spec.loader.exec_module(loaded)
    except BaseException:
        del sys.modules[module]
        raise
    return loaded


class PythonModelRuntime(ModelRuntime):
    """Serves a Python class or function from the model folder."""

    kind: ClassVar[str] = "python"

    def __init__(self, model_dir: Path, config: ServingConfig) -> None:
        super().__init__(model_dir, config)
        self._predict: PredictFn | None = None

    def load(self) -> None:
        """Import the entrypoint, instantiate it if it is a class and call its ``load()`` if it has one."""
        entrypoint = self.config.entrypoint or ""
        module_name, sep, attribute = entrypoint.partition(":")
        if not sep or not module_name or not attribute:
            raise ModelLoadError(f"entrypoint {entrypoint!r} must be 'module:attribute'")
        try:
            module = import_from_folder(self.model_dir, module_name)
        except ModelLoadError:
            raise
        except ModuleNotFoundError as exc:
            raise ModelLoadError(f"entrypoint {entrypoint!r}: cannot import module {module_name!r}: {exc}") from exc
        except Exception as exc:
            log.exception("importing %s failed", module_name)
            raise ModelLoadError(f"entrypoint {entrypoint!r}: importing {module_name!r} failed: {exc!r}") from exc
        target: Any = module
        for part in attribute.split("."):
            if not hasattr(target, part):
                raise ModelLoadError(f"entrypoint {entrypoint!r}: module {module_name!r} has no attribute {part!r}")
            target = getattr(target, part)
        self._predict = self._predict_function(entrypoint, target)

    @staticmethod
    def _predict_function(entrypoint: str, target: Any) -> PredictFn:
        def plain(name: str, method: Any) -> None:
            # Called from worker threads with no event loop, a coroutine function would only return a coroutine:
            # an async load() would be skipped without a word (MLServer's models are written so).
            if inspect.iscoroutinefunction(method):
                raise ModelLoadError(
                    f"entrypoint {entrypoint!r}: {name} is async def; the python runtime calls it from worker "
                    "threads, so it must be a plain def"
                )

        if inspect.isclass(target):
            plain("predict", getattr(target, "predict", None))
            plain("load", getattr(target, "load", None))
            try:
                instance = target()
            except Exception as exc:
                raise ModelLoadError(f"entrypoint {entrypoint!r}: {target.__name__}() failed: {exc!r}") from exc
            predict = getattr(instance, "predict", None)
            if not callable(predict):
                raise ModelLoadError(f"entrypoint {entrypoint!r}: class {target.__name__} has no predict method")
            load = getattr(instance, "load", None)
            if callable(load):
                try:
                    load()
                except Exception as exc:
                    raise ModelLoadError(f"entrypoint {entrypoint!r}: load() failed: {exc!r}") from exc
            return predict  # type: ignore[no-any-return]
        if callable(target):
            plain("predict", target)
            return target  # type: ignore[no-any-return]
        raise ModelLoadError(f"entrypoint {entrypoint!r} is neither a class nor a function")

    def predict(self, inputs: dict[str, np.ndarray]) -> Mapping[str, Any]:
        """Call the model's predict with the input arrays."""
        if self._predict is None:
            raise RuntimeError("the model is not loaded")
        return self._predict(inputs)
