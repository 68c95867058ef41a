"""How the tensorflow runtime reads a ``serving_default`` signature, with stand-ins for TensorFlow's objects.

TensorFlow is an optional extra, usually not installed where the tests run; the objects ``_signature`` reads
(``structured_input_signature``, ``structured_outputs``, TensorSpec's dtype and shape) are small enough to imitate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from protos.topology.models import Signature, TensorSpec
from runtimes.errors import ModelLoadError
from runtimes.serving_config import parse_serving_config
from runtimes.signatures import check_signature
from runtimes.tensorflow_model import _signature

SERVING_YAML = """\
runtime: tensorflow
files: [saved]
signature:
  inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]
  outputs: [{name: y, datatype: FP32, shape: [-1, 3]}]
"""


@dataclass
class _DType:
    as_numpy_dtype: Any


@dataclass
class _Shape:
    dims: list[int | None] | None

    @property
    def rank(self) -> int | None:
        return None if self.dims is None else len(self.dims)

    def as_list(self) -> list[int | None]:
        if self.dims is None:
            raise ValueError("as_list() is not defined on an unknown TensorShape.")
        return list(self.dims)


@dataclass
class _Spec:
    dtype: _DType
    shape: _Shape


@dataclass
class _Function:
    structured_input_signature: tuple[tuple[()], dict[str, _Spec]]
    structured_outputs: dict[str, _Spec]


def _function(x: _Spec, y: _Spec) -> _Function:
    return _Function(((), {"x": x}), {"y": y})


def test_known_shapes() -> None:
    function = _function(_Spec(_DType(np.float32), _Shape([None, 4])), _Spec(_DType(np.float32), _Shape([None, 3])))
    assert _signature(function, parse_serving_config(SERVING_YAML)) == Signature(
        inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 4])],
        outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1, 3])],
    )


def test_a_tensor_of_unknown_rank_takes_the_declared_shape() -> None:
    # tf.TensorSpec(shape=None) has no rank; it was read as a scalar ([]) and every declared shape was refused
    # ("the SavedModel says [], serving.yaml says [-1, 4]").
    config = parse_serving_config(SERVING_YAML)
    function = _function(_Spec(_DType(np.float32), _Shape(None)), _Spec(_DType(np.float32), _Shape(None)))
    known = _signature(function, config)
    assert known == config.signature
    check_signature(config.signature, known, "the SavedModel")


def test_a_datatype_the_protocol_lacks_is_named() -> None:
    # complex64 (or bfloat16) has no Open Inference Protocol datatype: a ValueError from inside datatype_of left the
    # runtime with a traceback instead of a load error naming the tensor.
    function = _function(_Spec(_DType(np.complex64), _Shape([None, 4])), _Spec(_DType(np.float32), _Shape([None])))
    with pytest.raises(ModelLoadError, match=r"^the SavedModel's input 'x' has dtype complex64, which no"):
        _signature(function, parse_serving_config(SERVING_YAML))
