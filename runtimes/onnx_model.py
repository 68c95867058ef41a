"""The ``onnx`` runtime: an ONNX graph run by onnxruntime on the CPU.

This is the path for TensorFlow (tf2onnx), PyTorch (torch.onnx.export) and scikit-learn (skl2onnx) models. The
first file listed in serving.yaml is the ``.onnx`` file. Inputs and outputs map to graph inputs and outputs by
name, so a classifier's label and probabilities are simply two outputs of the graph; the signature may declare a
subset of the graph's outputs. The graph's own inputs and outputs (names, datatypes, shapes; symbolic dimensions
are -1; a tensor of unknown rank takes the declared shape) are the inferred signature, checked against
serving.yaml at registration and at load.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from protos.topology.models import Datatype, Signature, TensorSpec
from runtimes.base import ModelRuntime
from runtimes.errors import InvalidInput, ModelLoadError
from runtimes.serving_config import ServingConfig
from runtimes.signatures import check_signature, source_name
from runtimes.tensors import numpy_dtype, text_array

#: onnxruntime's type strings of tensors to Open Inference Protocol datatypes.
_DATATYPES: dict[str, Datatype] = {
    "tensor(bool)": "BOOL",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def _session(model_dir: Path, config: ServingConfig) -> Any:
    import onnxruntime

    if not config.files:
        raise ModelLoadError("the onnx runtime needs the .onnx file as the first entry of 'files'")
    path = model_dir / config.files[0]
    options = onnxruntime.SessionOptions()
    # The data plane already runs several predictions at once on its worker threads; an intra-op pool per call
    # sized to every core would only oversubscribe the CPU.
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelLoadError(f"cannot load {config.files[0]} with onnxruntime: {exc}") from exc


def _spec(arg: Any, declared: TensorSpec | None, unranked: set[str]) -> TensorSpec | None:
    datatype = _DATATYPES.get(arg.type)
    if datatype is None:
        return None  # sequences and maps (e.g. skl2onnx's ZipMap) cannot be OIP tensors
    if arg.name in unranked:
        # The graph does not know the rank: any declared shape may be right (the data plane checks the answers).
        return TensorSpec(name=arg.name, datatype=datatype, shape=list(declared.shape) if declared else [])
    # Symbolic ("batch"), unknown (None) and zero-sized dims are all "any size" to us.
    shape = [dim if isinstance(dim, int) and dim > 0 else -1 for dim in (arg.shape or [])]
    return TensorSpec(name=arg.name, datatype=datatype, shape=shape)


def _unranked(path: Path, args: list[Any]) -> set[str]:
    """Names among ``args`` (graph inputs and outputs) whose rank the graph leaves unknown.

    onnxruntime reports both a scalar and a tensor of unknown rank as shape []; only the ONNX file tells them
    apart, so it is read (without external weights) only when some tensor has that shape.
    """
    maybe = {arg.name for arg in args if not arg.shape and arg.type in _DATATYPES}
    if not maybe:
        return set()
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:
        # onnxruntime read the file; if onnx cannot, the [] shapes stay scalars (the check then names them).
        return set()
    return {
        info.name
        for info in (*graph.input, *graph.output)
        if info.name in maybe and not info.type.tensor_type.HasField("shape")
    }


def _session_signature(session: Any, config: ServingConfig, path: Path) -> tuple[Signature, list[str]]:
    inputs, outputs, unusable = [], [], []
    declared_specs = {spec.name: spec for spec in (*config.signature.inputs, *config.signature.outputs)}
    unranked = _unranked(path, [*session.get_inputs(), *session.get_outputs()])
    for arg in session.get_inputs():
        spec = _spec(arg, declared_specs.get(arg.name), unranked)
        if spec is None:
            raise ModelLoadError(f"graph input {arg.name!r} has type {arg.type}; only tensor inputs can be served")
        inputs.append(spec)
    for arg in session.get_outputs():
        spec = _spec(arg, declared_specs.get(arg.name), unranked)
        if spec is None:
            unusable.append(f"{arg.name} ({arg.type})")
        else:
            outputs.append(spec)
    declared = {spec.name for spec in config.signature.outputs}
    bad = [u for u in unusable if u.split(" ", 1)[0] in declared]
    if bad:
        raise ModelLoadError(f"graph outputs {', '.join(bad)} are not tensors and cannot be served")
    if not outputs:
        raise ModelLoadError("the graph has no tensor outputs")
    return Signature(inputs=inputs, outputs=outputs), [spec.name for spec in config.signature.outputs]


def _shared_dimensions(session: Any) -> list[tuple[str, list[tuple[str, int]]]]:
    """Symbolic dimensions the graph gives several inputs (or axes): (symbol, [(input, axis), ...]) for each."""
    places: dict[str, list[tuple[str, int]]] = {}
    for arg in session.get_inputs():
        for axis, dim in enumerate(arg.shape or []):
            if isinstance(dim, str) and dim:
                places.setdefault(dim, []).append((arg.name, axis))
    return [(symbol, where) for symbol, where in places.items() if len(where) > 1]


def signature_of(model_dir: Path, config: ServingConfig) -> Signature:
    """The graph's inputs and outputs (names, datatypes, shapes; symbolic dimensions are -1)."""
    return _session_signature(_session(model_dir, config), config, model_dir / config.files[0])[0]


class OnnxRuntime(ModelRuntime):
    """Serves an ONNX graph with onnxruntime's CPU provider."""

    kind: ClassVar[str] = "onnx"

    def __init__(self, model_dir: Path, config: ServingConfig) -> None:
        super().__init__(model_dir, config)
        self._session: Any = None
        self._outputs: list[str] = []
        self._dtypes: dict[str, np.dtype[Any]] = {}
        self._shared: list[tuple[str, list[tuple[str, int]]]] = []

    def load(self) -> None:
        """Create the inference session and check the graph against the declared signature."""
        session = _session(self.model_dir, self.config)
        known, self._outputs = _session_signature(session, self.config, self.model_dir / self.config.files[0])
        check_signature(self.config.signature, known, source_name(self.kind))
        self._dtypes = {spec.name: numpy_dtype(spec.datatype) for spec in known.inputs}
        self._shared = _shared_dimensions(session)
        self._session = session

    def _check_shared(self, inputs: dict[str, np.ndarray]) -> None:
        # The signature's -1 accepts any size per input; sizes the graph names alike (rows of input_ids and of
        # attention_mask) must also agree, else onnxruntime fails inside some node, which reads as the model's bug.
        for symbol, places in self._shared:
            first, first_axis = places[0]
            size = inputs[first].shape[first_axis]
            for name, axis in places[1:]:
                if inputs[name].shape[axis] != size:
                    raise InvalidInput(
                        f"input {name!r} has {inputs[name].shape[axis]} in dimension {axis}, input {first!r} {size}: "
                        f"the graph names both {symbol!r}, so they must be equal"
                    )

    def predict(self, inputs: dict[str, np.ndarray]) -> Mapping[str, Any]:
        """Run the graph for the declared outputs only (onnxruntime skips the nodes nothing needs)."""
        if self._session is None:
            raise RuntimeError("the model is not loaded")
        if self._shared:
            self._check_shared(inputs)
        feed = {}
        for name, array in inputs.items():
            dtype = self._dtypes[name]
            # BYTES arrive as object arrays of bytes; onnxruntime wants str for tensor(string).
            if dtype.kind == "O":
                feed[name] = text_array(name, array)
            else:
                feed[name] = array if array.dtype == dtype else array.astype(dtype)
        results = self._session.run(self._outputs, feed)
        return dict(zip(self._outputs, results, strict=True))
