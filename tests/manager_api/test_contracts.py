"""The contract check across an application's stages and within each stage's variants (no processes needed)."""

from __future__ import annotations

import pytest

from manager_api.contracts import ContractError, StageModel, check_application, shapes_fit
from protos.topology import Signature, TensorSpec


def _model(
    where: str, inputs: list[tuple[str, str, list[int]]], outputs: list[tuple[str, str, list[int]]]
) -> StageModel:
    signature = Signature(
        inputs=[TensorSpec(name=n, datatype=d, shape=s) for n, d, s in inputs],  # type: ignore[arg-type]
        outputs=[TensorSpec(name=n, datatype=d, shape=s) for n, d, s in outputs],  # type: ignore[arg-type]
    )
    return StageModel(where, where.split(".")[0].replace("stages", "m"), 1, signature)


EXTRACT = _model("stages[0].variants[0]", [("text", "BYTES", [-1])], [("features", "FP32", [-1, 4])])
CLASSIFY = _model("stages[1].variants[0]", [("features", "FP32", [-1, 4])], [("label", "INT64", [-1])])


@pytest.mark.parametrize(
    ("given", "wanted", "fits"),
    [([-1, 4], [-1, 4], True), ([8, 4], [-1, 4], True), ([-1, 4], [8, 4], True), ([-1, 3], [-1, 4], False)],
)
def test_shapes_fit(given: list[int], wanted: list[int], fits: bool) -> None:
    assert shapes_fit(given, wanted) is fits
    assert not shapes_fit([-1], [-1, 4])


def test_a_pipeline_whose_stages_fit_passes() -> None:
    check_application([[EXTRACT], [CLASSIFY]])
    # Extra outputs of a stage are fine: the next stage takes what it names.
    wider = _model(
        "stages[0].variants[0]", [("text", "BYTES", [-1])], [("features", "FP32", [-1, 4]), ("n", "INT32", [-1])]
    )
    check_application([[wider], [CLASSIFY]])


@pytest.mark.parametrize(
    ("following", "fragments"),
    [
        (
            _model("stages[1].variants[0]", [("vector", "FP32", [-1, 4])], [("label", "INT64", [-1])]),
            [
                "stages[1].variants[0]",
                "input vector (FP32 [-1, 4])",
                "not among the outputs",
                "features (FP32 [-1, 4])",
            ],
        ),
        (
            _model("stages[1].variants[0]", [("features", "FP64", [-1, 4])], [("label", "INT64", [-1])]),
            ["input features (FP64 [-1, 4])", "datatype FP32 is not FP64"],
        ),
        (
            _model("stages[1].variants[0]", [("features", "FP32", [-1, 5])], [("label", "INT64", [-1])]),
            ["input features (FP32 [-1, 5])", "shapes do not fit"],
        ),
    ],
)
def test_a_stage_input_not_given_by_the_stage_before(following: StageModel, fragments: list[str]) -> None:
    with pytest.raises(ContractError) as error:
        check_application([[EXTRACT], [following]])
    for fragment in fragments:
        assert fragment in str(error.value)


def test_variants_of_a_stage_must_be_interchangeable() -> None:
    renamed = _model("stages[1].variants[1]", [("features", "FP32", [-1, 4])], [("class", "INT64", [-1])])
    with pytest.raises(ContractError, match=r"stages\[1\]\.variants\[1\].*outputs are class.*has label"):
        check_application([[EXTRACT], [CLASSIFY, renamed]])
    retyped = _model("stages[1].variants[1]", [("features", "FP16", [-1, 4])], [("label", "INT64", [-1])])
    with pytest.raises(ContractError, match=r"input features \(FP16 \[-1, 4\]\) differs from features \(FP32"):
        check_application([[EXTRACT], [CLASSIFY, retyped]])
