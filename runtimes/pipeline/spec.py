"""What a pipeline runtime serves: one application record and the signature of every model version it names.

The file given with ``--spec`` is JSON::

    {"application": {...the applications/{app} record...},
     "signatures": {"fe:1": {"inputs": [...], "outputs": [...]}, "clf:2": {...}}}

Loading it checks the contract between stages (protos/contracts.py: the rule the manager applies when the application
is written), so a pipeline that cannot work never starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from protos.contracts import ContractError, check_application, version_key
from protos.topology.applications import Application, Stage
from protos.topology.models import Signature, TensorSpec


class PipelineSpecError(ValueError):
    """The spec file is unreadable or describes a pipeline that cannot work; the message says why."""


class PipelineSpecFile(BaseModel):
    """The JSON document of ``--spec``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    application: Application
    #: Signatures by "model:version", for every variant and shadow of every stage.
    signatures: dict[str, Signature]


@dataclass(frozen=True)
class StagePlan:
    """One stage as the executor runs it: what it takes, what it gives, and who shadows it."""

    index: int  # 1-based, as users and headers count stages
    stage: Stage
    #: The stage's inputs (the same for every variant and shadow), from the previous stage's outputs.
    inputs: tuple[TensorSpec, ...]
    #: The outputs every variant of the stage has (the next stage takes its inputs from these).
    outputs: tuple[TensorSpec, ...]
    shadows: tuple[str, ...]  # "model:version"

    @property
    def variants(self) -> str:
        """The stage's live variants, for error messages: ``fe:1`` or ``clf:1|clf:2``."""
        return "|".join(version_key(v.model, v.version) for v in self.stage.variants if v.weight > 0)


@dataclass(frozen=True)
class PipelineSpec:
    """A checked pipeline: the application, its stages in order and its signature."""

    application: Application
    stages: tuple[StagePlan, ...]
    signature: Signature

    @property
    def name(self) -> str:
        return self.application.name


def build_spec(document: PipelineSpecFile) -> PipelineSpec:
    """Check the contract between stages (protos/contracts.py, the manager's rule) and plan each stage."""
    app = document.application
    try:
        contract = check_application(app, document.signatures)
    except ContractError as exc:
        raise PipelineSpecError(f"application {app.name!r} {exc}") from None
    stages = tuple(
        StagePlan(
            index,
            stage,
            terms.inputs,
            terms.outputs,
            tuple(version_key(s.model, s.version) for s in stage.shadows),
        )
        for index, (stage, terms) in enumerate(zip(app.stages, contract.stages, strict=True), start=1)
    )
    return PipelineSpec(app, stages, contract.signature)


def load_spec(path: Path) -> PipelineSpec:
    """Read and check a spec file; PipelineSpecError says what is wrong with it."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise PipelineSpecError(f"cannot read the pipeline spec {path}: {exc}") from exc
    try:
        document = PipelineSpecFile.model_validate(json.loads(text))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise PipelineSpecError(f"{path} is not a valid pipeline spec: {exc}") from exc
    return build_spec(document)
