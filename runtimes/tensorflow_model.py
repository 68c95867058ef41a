"""The ``tensorflow`` runtime (optional extra ``hydro-serving[tensorflow]``): a TensorFlow SavedModel.

The first entry of ``files`` is the SavedModel folder (``saved_model.pb`` and ``variables/``). Its
``serving_default`` signature is what is served: inputs and outputs map to the signature's keyword arguments and
output keys by name. TensorFlow is imported only when such a model is loaded, so the other runtimes never pay for
it; without the extra, loading says how to install it. ONNX (tf2onnx) is the lighter way to serve TensorFlow.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from protos.topology.models import Signature, TensorSpec
from runtimes.base import ModelRuntime
from runtimes.errors import ModelLoadError
from runtimes.serving_config import ServingConfig
from runtimes.signatures import check_signature, source_name
from runtimes.tensors import datatype_of

SIGNATURE_KEY = "serving_default"


def _tensorflow() -> Any:
    try:
        import tensorflow
    except ImportError as exc:
        raise ModelLoadError(
            "the tensorflow runtime needs TensorFlow: pip install 'hydro-serving[tensorflow]'"
        ) from exc
    return tensorflow


def _load(model_dir: Path, config: ServingConfig) -> tuple[Any, Any]:
    """The loaded SavedModel (kept alive: the function refers to its variables) and its serving function."""
    tf = _tensorflow()
    if not config.files:
        raise ModelLoadError("the tensorflow runtime needs the SavedModel folder as the first entry of 'files'")
    try:
        loaded = tf.saved_model.load(str(model_dir / config.files[0]))
    except Exception as exc:
        raise ModelLoadError(f"cannot load the SavedModel {config.files[0]}: {exc}") from exc
    signatures = getattr(loaded, "signatures", {})
    if SIGNATURE_KEY not in signatures:
        raise ModelLoadError(
            f"the SavedModel {config.files[0]} has no {SIGNATURE_KEY!r} signature (it has: {', '.join(signatures)})"
        )
    return loaded, signatures[SIGNATURE_KEY]


def _spec(kind: str, name: str, tensor_spec: Any, declared: TensorSpec | None) -> TensorSpec:
    dtype = np.dtype(tensor_spec.dtype.as_numpy_dtype)
    try:
        datatype = datatype_of(dtype)
    except ValueError:
        raise ModelLoadError(
            f"the SavedModel's {kind} {name!r} has dtype {dtype}, which no Open Inference Protocol datatype holds"
        ) from None
    if tensor_spec.shape.rank is None:
        # tf.TensorSpec(shape=None): any rank, so the declared shape may be right (the data plane checks answers).
        shape = list(declared.shape) if declared is not None else []
    else:
        shape = [-1 if dim is None else int(dim) for dim in tensor_spec.shape.as_list()]
    return TensorSpec(name=name, datatype=datatype, shape=shape)  # type: ignore[arg-type]


def _signature(function: Any, config: ServingConfig) -> Signature:
    _, keyword_specs = function.structured_input_signature
    declared_inputs = {spec.name: spec for spec in config.signature.inputs}
    declared_outputs = {spec.name: spec for spec in config.signature.outputs}
    inputs = [_spec("input", n, s, declared_inputs.get(n)) for n, s in sorted(keyword_specs.items())]
    outputs = [_spec("output", n, s, declared_outputs.get(n)) for n, s in sorted(function.structured_outputs.items())]
    return Signature(inputs=inputs, outputs=outputs)


def signature_of(model_dir: Path, config: ServingConfig) -> Signature:
    """The ``serving_default`` signature's inputs and outputs (unknown dimensions are -1, an unknown rank takes the
    declared shape)."""
    return _signature(_load(model_dir, config)[1], config)


class TensorFlowRuntime(ModelRuntime):
    """Serves the ``serving_default`` signature of a SavedModel."""

    kind: ClassVar[str] = "tensorflow"

    def __init__(self, model_dir: Path, config: ServingConfig) -> None:
        super().__init__(model_dir, config)
        self._loaded: Any = None
        self._function: Any = None
        self._tf: Any = None

    def load(self) -> None:
        """Load the SavedModel and check its serving signature against serving.yaml."""
        self._loaded, function = _load(self.model_dir, self.config)
        check_signature(self.config.signature, _signature(function, self.config), source_name(self.kind))
        self._tf = _tensorflow()
        self._function = function

    def predict(self, inputs: dict[str, np.ndarray]) -> Mapping[str, Any]:
        """Call the serving function with the inputs as keyword arguments."""
        if self._function is None:
            raise RuntimeError("the model is not loaded")
        tensors = {name: self._tf.constant(array) for name, array in inputs.items()}
        results = self._function(**tensors)
        return {name: value.numpy() for name, value in results.items()}
