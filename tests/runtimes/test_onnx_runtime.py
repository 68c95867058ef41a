"""The onnx runtime in process: graphs built with onnx's helper API, answers compared with onnxruntime's own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from framework_models import (
    LINEAR_B,
    LINEAR_W,
    ONNX_LINEAR_YAML,
    ROWS,
    onnx_classifier,
    onnx_linear,
    serve_in_process,
)

from protos.topology.models import Signature, TensorSpec
from runtimes.base import create_runtime
from runtimes.errors import InvalidInput, ModelLoadError
from runtimes.onnx_model import OnnxRuntime, signature_of
from runtimes.serving_config import load_serving_config


def _loaded(folder: Path) -> OnnxRuntime:
    runtime = create_runtime(folder, load_serving_config(folder))
    assert isinstance(runtime, OnnxRuntime)
    runtime.load()
    return runtime


def _own_answers(path: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed), strict=True))


def test_linear_graph(tmp_path: Path) -> None:
    runtime = _loaded(onnx_linear(tmp_path / "m"))
    assert runtime.kind == "onnx"
    result = runtime.predict({"x": ROWS})
    np.testing.assert_allclose(result["y"], ROWS @ LINEAR_W + LINEAR_B, rtol=1e-5)


def test_inputs_of_another_numeric_type_are_converted(tmp_path: Path) -> None:
    runtime = _loaded(onnx_linear(tmp_path / "m"))
    result = runtime.predict({"x": ROWS.astype(np.float64)})
    assert result["y"].dtype == np.float32


async def test_classifier_outputs_by_name_through_the_data_plane(tmp_path: Path) -> None:
    folder = onnx_classifier(tmp_path / "m")
    outputs = await serve_in_process(folder, {"input": ROWS})
    expected = _own_answers(folder / "iris.onnx", {"input": ROWS})
    assert outputs["label"].dtype == np.int64
    np.testing.assert_array_equal(outputs["label"], expected["label"])
    np.testing.assert_allclose(outputs["probabilities"], expected["probabilities"], rtol=1e-6)
    assert outputs["label"].tolist() == [0, 0, 1, 1, 2, 2]
    # The graph's third output ("logits") is not declared, so it is not served.
    assert set(outputs) == {"label", "probabilities"}


def test_signature_is_the_graph(tmp_path: Path) -> None:
    folder = onnx_classifier(tmp_path / "m")
    assert signature_of(folder, load_serving_config(folder)) == Signature(
        inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, 4])],
        outputs=[
            TensorSpec(name="label", datatype="INT64", shape=[-1]),
            TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 3]),
            TensorSpec(name="logits", datatype="FP32", shape=[-1, 3]),
        ],
    )


def test_shape_mismatch_names_the_field(tmp_path: Path) -> None:
    folder = onnx_linear(tmp_path / "m", features=3)
    with pytest.raises(ModelLoadError) as error:
        _loaded(folder)
    assert str(error.value) == "signature.inputs[0].shape: the ONNX graph says [-1, 4], serving.yaml says [-1, 3]"


def test_datatype_and_output_mismatches(tmp_path: Path) -> None:
    folder = onnx_classifier(tmp_path / "m")
    yaml = (folder / "serving.yaml").read_text()
    (folder / "serving.yaml").write_text(
        yaml.replace("name: input, datatype: FP32", "name: input, datatype: FP64").replace("probabilities", "proba")
    )
    with pytest.raises(ModelLoadError) as error:
        _loaded(folder)
    message = str(error.value)
    assert "signature.inputs[0].datatype: the ONNX graph says FP32, serving.yaml says FP64" in message
    assert "signature.outputs[1].name: the ONNX graph has no output 'proba'" in message
    assert "'probabilities'" in message


def test_undeclared_graph_input(tmp_path: Path) -> None:
    folder = onnx_linear(tmp_path / "m")
    yaml = (folder / "serving.yaml").read_text().replace("name: x,", "name: features,")
    (folder / "serving.yaml").write_text(yaml)
    with pytest.raises(ModelLoadError, match=r"the ONNX graph needs input 'x' \(FP32 \[-1, 4\]\)"):
        _loaded(folder)


@pytest.mark.parametrize("content", [b"", b"not an onnx model", b"\x08\x07\x12\x03abc"])
def test_bad_file_is_a_clear_load_error(tmp_path: Path, content: bytes) -> None:
    folder = onnx_linear(tmp_path / "m")
    (folder / "linear.onnx").write_bytes(content)
    with pytest.raises(ModelLoadError, match=r"cannot load linear\.onnx with onnxruntime"):
        _loaded(folder)


def _text_identity(folder: Path) -> Path:
    """A graph whose string input comes back unchanged: x BYTES [-1] -> y BYTES [-1]."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "text",
        [helper.make_tensor_value_info("x", TensorProto.STRING, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.STRING, ["batch"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True)
    onnx.save(model, str(folder / "text.onnx"))
    (folder / "serving.yaml").write_text(
        "runtime: onnx\nfiles: [text.onnx]\nsignature:\n"
        "  inputs: [{name: x, datatype: BYTES, shape: [-1]}]\n  outputs: [{name: y, datatype: BYTES, shape: [-1]}]\n"
    )
    return folder


async def test_string_tensors_and_bytes_that_are_not_text(tmp_path: Path) -> None:
    folder = _text_identity(tmp_path / "m")
    words = np.array(["h\u00e9llo".encode(), b""], dtype=object)
    outputs = await serve_in_process(folder, {"x": words})
    assert outputs["y"].tolist() == words.tolist()
    # onnxruntime's string tensors are text: bytes that are not UTF-8 are the client's mistake (400 naming the
    # input), not a UnicodeDecodeError from inside the model call (500).
    with pytest.raises(InvalidInput, match=r"input 'x': BYTES element 1 is not UTF-8"):
        await serve_in_process(folder, {"x": np.array([b"ok", b"\xff\xfe"], dtype=object)})


def _unranked(folder: Path) -> Path:
    """x FP32 of unknown rank -> MatMul -> y of unknown rank: what converters write when they know no shapes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Identity", ["xw"], ["y"])],
        "unranked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(LINEAR_W, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True)
    onnx.save(model, str(folder / "linear.onnx"))
    (folder / "serving.yaml").write_text(ONNX_LINEAR_YAML.format(features=4))
    return folder


async def test_a_graph_of_unknown_ranks_takes_the_declared_shapes(tmp_path: Path) -> None:
    # onnxruntime reports an input or output of unknown rank as [], as it does a scalar; the check then refused the
    # declared [-1, 4] ("the ONNX graph says []"), so such a graph could not be served at all.
    folder = _unranked(tmp_path / "m")
    config = load_serving_config(folder)
    assert signature_of(folder, config) == config.signature
    outputs = await serve_in_process(folder, {"x": ROWS})
    np.testing.assert_allclose(outputs["y"], ROWS @ LINEAR_W, rtol=1e-5)


def test_a_scalar_is_still_a_scalar(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "scalar",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder = tmp_path / "m"
    folder.mkdir()
    onnx.save(model, str(folder / "s.onnx"))
    (folder / "serving.yaml").write_text(
        "runtime: onnx\nfiles: [s.onnx]\nsignature:\n"
        "  inputs: [{name: x, datatype: FP32, shape: [-1]}]\n  outputs: [{name: y, datatype: FP32, shape: [-1]}]\n"
    )
    with pytest.raises(ModelLoadError) as error:
        _loaded(folder)
    assert str(error.value) == (
        "signature.inputs[0].shape: the ONNX graph says [], serving.yaml says [-1]; "
        "signature.outputs[0].shape: the ONNX graph says [], serving.yaml says [-1]"
    )


def _two_inputs(folder: Path) -> Path:
    """s = a + b, both [batch, seq]: what a BERT-like graph's input_ids and attention_mask share."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["s"])],
        "add",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", "seq"]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch", "seq"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True)
    onnx.save(model, str(folder / "add.onnx"))
    (folder / "serving.yaml").write_text(
        "runtime: onnx\nfiles: [add.onnx]\nsignature:\n"
        "  inputs: [{name: a, datatype: FP32, shape: [-1, -1]}, {name: b, datatype: FP32, shape: [-1, -1]}]\n"
        "  outputs: [{name: s, datatype: FP32, shape: [-1, -1]}]\n"
    )
    return folder


@pytest.mark.parametrize(
    ("b_shape", "message"),
    [
        ((3, 2), r"input 'b' has 3 in dimension 0, input 'a' 2: the graph names both 'batch', so they must be equal"),
        ((2, 5), r"input 'b' has 5 in dimension 1, input 'a' 2: the graph names both 'seq', so they must be equal"),
    ],
)
async def test_inputs_that_share_a_symbolic_dimension_must_agree(
    tmp_path: Path, b_shape: tuple[int, int], message: str
) -> None:
    # Rows of a and b that differ are the client's mistake; onnxruntime found out only inside the Add node, a 500
    # ("Attempting to broadcast an axis by a dimension other than 1. 2 by 3").
    folder = _two_inputs(tmp_path / "m")
    a = np.ones((2, 2), np.float32)
    with pytest.raises(InvalidInput, match=f"^{message}$"):
        await serve_in_process(folder, {"a": a, "b": np.ones(b_shape, np.float32)})
    outputs = await serve_in_process(folder, {"a": a, "b": np.full((2, 2), 2, np.float32)})
    assert outputs["s"].tolist() == [[3, 3], [3, 3]]
