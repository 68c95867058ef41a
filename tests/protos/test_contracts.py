"""The contract between an application's model versions (protos/contracts.py), as the manager and the pipeline
runtime both apply it. No processes needed."""

from __future__ import annotations

from typing import Any

import pytest

from protos.contracts import ContractError, check_application, shapes_fit
from protos.topology.applications import Application
from protos.topology.models import Signature


def _sig(inputs: list[tuple[str, str, list[int]]], outputs: list[tuple[str, str, list[int]]]) -> Signature:
    def tensors(items: list[tuple[str, str, list[int]]]) -> list[dict[str, Any]]:
        return [{"name": n, "datatype": d, "shape": s} for n, d, s in items]

    return Signature.model_validate({"inputs": tensors(inputs), "outputs": tensors(outputs)})


def _app(*stages: list[tuple[str, int]], shadows: dict[int, list[str]] | None = None) -> Application:
    document = []
    for index, variants in enumerate(stages):
        weights = [100 // len(variants)] * len(variants)
        weights[0] += 100 - sum(weights)
        stage: dict[str, Any] = {
            "variants": [{"model": m, "version": v, "weight": w} for (m, v), w in zip(variants, weights, strict=True)]
        }
        stage["shadows"] = [
            {"model": k.split(":")[0], "version": int(k.split(":")[1])} for k in (shadows or {}).get(index, [])
        ]
        document.append(stage)
    return Application.model_validate({"name": "app", "stages": document})


SIGNATURES = {
    "fe:1": _sig([("text", "BYTES", [-1])], [("features", "FP32", [-1, 4])]),
    "clf:1": _sig([("features", "FP32", [-1, 4])], [("label", "INT64", [-1]), ("p", "FP32", [-1, 3])]),
    "clf:2": _sig([("features", "FP32", [-1, 4])], [("label", "INT64", [-1])]),
}


@pytest.mark.parametrize(
    ("given", "wanted", "fits"),
    [([-1, 4], [-1, 4], True), ([8, 4], [-1, 4], True), ([-1, 4], [8, 4], True), ([-1, 3], [-1, 4], False)],
)
def test_shapes_fit(given: list[int], wanted: list[int], fits: bool) -> None:
    assert shapes_fit(given, wanted) is fits
    assert not shapes_fit([-1], [-1, 4])


def test_a_pipeline_takes_the_first_inputs_and_gives_the_outputs_all_last_variants_share() -> None:
    contract = check_application(_app([("fe", 1)], [("clf", 1), ("clf", 2)]), SIGNATURES)
    assert [t.name for t in contract.signature.inputs] == ["text"]
    # clf:2 gives no "p": only what every variant gives is the pipeline's.
    assert [t.name for t in contract.signature.outputs] == ["label"]
    assert [t.name for t in contract.stages[0].outputs] == ["features"]


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        (
            {"clf:2": _sig([("vector", "FP32", [-1, 4])], [("label", "INT64", [-1])])},
            ["stage 2: clf:2 takes vector but clf:1 takes features", "same request"],
        ),
        (
            {
                "clf:1": _sig([("features", "FP64", [-1, 4])], [("label", "INT64", [-1])]),
                "clf:2": _sig([("features", "FP64", [-1, 4])], [("label", "INT64", [-1])]),
            },
            ["stage 2: clf:1 needs input features (FP64 [-1, 4])", "datatype FP32 is not FP64"],
        ),
        (
            {
                "clf:1": _sig([("features", "FP32", [-1, 5])], [("label", "INT64", [-1])]),
                "clf:2": _sig([("features", "FP32", [-1, 5])], [("label", "INT64", [-1])]),
            },
            ["stage 2: clf:1 needs input features (FP32 [-1, 5])", "stage 1 gives features (FP32 [-1, 4])", "shapes"],
        ),
        (
            {"clf:2": _sig([("features", "FP32", [-1, 4])], [("label", "FP32", [-1])])},
            ["stage 2: output label (INT64 [-1]) of clf:1 is label (FP32 [-1]) in clf:2"],
        ),
        (
            {"clf:2": _sig([("features", "FP32", [-1, 4])], [("class", "INT64", [-1])])},
            ["stage 2: its variants clf:1, clf:2 share no output"],
        ),
    ],
)
def test_broken_contracts_name_the_stage_the_version_and_the_tensors(
    override: dict[str, Signature], fragments: list[str]
) -> None:
    with pytest.raises(ContractError) as error:
        check_application(_app([("fe", 1)], [("clf", 1), ("clf", 2)]), {**SIGNATURES, **override})
    for fragment in fragments:
        assert fragment in str(error.value)


def test_shadows_take_the_stage_input_and_need_a_signature() -> None:
    odd = {"shadow:1": _sig([("other", "FP32", [-1, 4])], [("label", "INT64", [-1])])}
    app = _app([("fe", 1)], [("clf", 2)], shadows={1: ["shadow:1"]})
    with pytest.raises(ContractError, match="stage 2: shadow:1 takes other but clf:2 takes features"):
        check_application(app, {**SIGNATURES, **odd})
    with pytest.raises(ContractError, match="stage 2: no signature for shadow:1"):
        check_application(app, SIGNATURES)
