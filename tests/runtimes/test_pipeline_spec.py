"""The pipeline runtime's spec: the contract between stages is checked before anything starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from runtimes.pipeline.spec import PipelineSpecError, load_spec


def _tensor(name: str, datatype: str = "FP32", shape: list[int] | None = None) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape or [-1, 4]}


def _document(**signatures: dict[str, Any]) -> dict[str, Any]:
    base = {
        "fe:1": {"inputs": [_tensor("raw")], "outputs": [_tensor("input")]},
        "clf:1": {"inputs": [_tensor("input")], "outputs": [_tensor("label", "INT64", [-1]), _tensor("p")]},
        "clf:2": {"inputs": [_tensor("input")], "outputs": [_tensor("label", "INT64", [-1])]},
        "shadow:1": {"inputs": [_tensor("input")], "outputs": [_tensor("label", "INT64", [-1])]},
    }
    base.update(signatures)
    stages = [
        {"variants": [{"model": "fe", "version": 1, "weight": 100}]},
        {
            "variants": [{"model": "clf", "version": 1, "weight": 50}, {"model": "clf", "version": 2, "weight": 50}],
            "shadows": [{"model": "shadow", "version": 1}],
        },
    ]
    return {"application": {"name": "shop", "stages": stages}, "signatures": base}


def _write(tmp_path: Path, document: dict[str, Any]) -> Path:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(document))
    return path


def test_signature_is_first_inputs_and_outputs_common_to_the_last_variants(tmp_path: Path) -> None:
    spec = load_spec(_write(tmp_path, _document()))
    assert [t.name for t in spec.signature.inputs] == ["raw"]
    # clf:2 has no "p": only what every variant gives is the pipeline's.
    assert [t.name for t in spec.signature.outputs] == ["label"]
    assert [plan.variants for plan in spec.stages] == ["fe:1", "clf:1|clf:2"]
    assert spec.stages[1].shadows == ("shadow:1",)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"clf:2": {"inputs": [_tensor("features")], "outputs": [_tensor("label")]}}, "clf:2 takes features but clf:1"),
        (
            {
                "clf:1": {"inputs": [_tensor("input", "FP64")], "outputs": [_tensor("x")]},
                "clf:2": {"inputs": [_tensor("input", "FP64")], "outputs": [_tensor("x")]},
                "shadow:1": {"inputs": [_tensor("input", "FP64")], "outputs": [_tensor("x")]},
            },
            r"stage 2: clf:1 needs input input \(FP64 \[-1, 4\]\), stage 1 gives input \(FP32",
        ),
        (
            {"clf:2": {"inputs": [_tensor("input")], "outputs": [_tensor("label", "FP32")]}},
            r"label \(INT64 \[-1\]\) of clf:1 is label \(FP32",
        ),
        (
            {"shadow:1": {"inputs": [_tensor("other")], "outputs": [_tensor("x")]}},
            "shadow:1 takes other but clf:1 takes input",
        ),
    ],
)
def test_broken_contracts_name_the_stage_and_tensor(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    with pytest.raises(PipelineSpecError, match=message):
        load_spec(_write(tmp_path, _document(**change)))


def test_missing_signature_is_named(tmp_path: Path) -> None:
    document = _document()
    del document["signatures"]["shadow:1"]
    with pytest.raises(PipelineSpecError, match=r"stage 2: no signature for shadow:1"):
        load_spec(_write(tmp_path, document))


@pytest.mark.parametrize("log_level", ["info", "critical"])
def test_runtime_exits_1_naming_the_problem(tmp_path: Path, log_level: str) -> None:
    # At any --log-level: the reason it gives up is logged at CRITICAL (at "critical" an ERROR line was dropped and
    # the process exited 1 saying nothing).
    document = _document()
    del document["signatures"]["fe:1"]
    argv = [sys.executable, "-m", "runtimes.pipeline", "--spec", str(_write(tmp_path, document))]
    argv += ["--outbound", "127.0.0.1:1", "--grpc-port", "0", "--http-port", "0", "--log-level", log_level]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "stage 1: no signature for fe:1" in done.stderr
