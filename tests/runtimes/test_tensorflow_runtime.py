"""The tensorflow runtime (optional extra): a SavedModel made by the test, served by its serving_default signature.

Skipped unless TensorFlow is installed (``pip install -e '.[tensorflow]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from framework_models import ROWS, serve_in_process

from runtimes.base import create_runtime
from runtimes.errors import ModelLoadError
from runtimes.serving_config import load_serving_config

tf: Any = pytest.importorskip(
    "tensorflow", reason="the tensorflow extra is not installed (pip install -e '.[tensorflow]')"
)

SERVING_YAML = """\
runtime: tensorflow
files: [saved]
signature:
  inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]
  outputs: [{name: y, datatype: FP32, shape: [-1, 3]}]
"""
WEIGHTS = np.arange(12, dtype=np.float32).reshape(4, 3) / 10


def _saved_model(folder: Path, serving_yaml: str = SERVING_YAML) -> Path:
    class Linear(tf.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(WEIGHTS)

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])  # type: ignore[untyped-decorator]
        def serve(self, x: Any) -> dict[str, Any]:
            return {"y": tf.matmul(x, self.w)}

    module = Linear()
    folder.mkdir(parents=True)
    tf.saved_model.save(module, str(folder / "saved"), signatures={"serving_default": module.serve})
    (folder / "serving.yaml").write_text(serving_yaml)
    return folder


async def test_saved_model_predicts(tmp_path: Path) -> None:
    outputs = await serve_in_process(_saved_model(tmp_path / "m"), {"x": ROWS})
    np.testing.assert_allclose(outputs["y"], ROWS @ WEIGHTS, rtol=1e-5)


def test_signature_mismatch_names_the_field(tmp_path: Path) -> None:
    folder = _saved_model(tmp_path / "m", SERVING_YAML.replace("[-1, 4]", "[-1, 5]"))
    runtime = create_runtime(folder, load_serving_config(folder))
    with pytest.raises(ModelLoadError, match=r"signature\.inputs\[0\]\.shape: the SavedModel says \[-1, 4\]"):
        runtime.load()


def test_not_a_saved_model(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    (folder / "saved").mkdir(parents=True)
    (folder / "serving.yaml").write_text(SERVING_YAML)
    runtime = create_runtime(folder, load_serving_config(folder))
    with pytest.raises(ModelLoadError, match="cannot load the SavedModel saved"):
        runtime.load()
