"""What a pipeline runtime serves: one application record and the signature of every model version it names.

The file given with ``--spec`` is JSON::

    {"application": {...the applications/{app} record...},
     "signatures": {"fe:1": {"inputs": [...], "outputs": [...]}, "clf:2": {...}}}

Loading it checks the contract between stages (each stage's inputs are outputs of every variant of the stage
before, with the same datatype), so a pipeline that cannot work never starts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from protos.topology import Application, Signature, Stage, TensorSpec


class PipelineSpecError(ValueError):
    """The spec file is unreadable or describes a pipeline that cannot work; the message says why."""


class PipelineSpecFile(BaseModel):
    """The JSON document of ``--spec``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    application: Application
    #: Signatures by "model:version", for every variant and shadow of every stage.
    signatures: dict[str, Signature]


def version_key(model: str, version: int) -> str:
    """How a model version is named in the spec's signatures and in the stages header: ``model:version``."""
    return f"{model}:{version}"


@dataclass(frozen=True)
class StagePlan:
    """One stage as the executor runs it: what it takes, what it gives, and who shadows it."""

    index: int  # 1-based, as users and headers count stages
    stage: Stage
    #: The stage's inputs, from the previous stage's outputs (or the pipeline's inputs for stage 1).
    inputs: tuple[TensorSpec, ...]
    #: The outputs every live variant of the stage has (the next stage takes its inputs from these).
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


def _describe(spec: TensorSpec) -> str:
    return f"{spec.name} ({spec.datatype})"


def _common(kind: str, where: str, signatures: Sequence[tuple[str, Signature]]) -> tuple[TensorSpec, ...]:
    """The tensors (inputs or outputs) that every signature has with the same datatype, in the first's order."""
    first_key, first = signatures[0]
    common = list(getattr(first, kind))
    for key, signature in signatures[1:]:
        theirs = {t.name: t for t in getattr(signature, kind)}
        for spec in list(common):
            other = theirs.get(spec.name)
            if other is None:
                common.remove(spec)
            elif other.datatype != spec.datatype:
                raise PipelineSpecError(
                    f"{where}: {kind[:-1]} {spec.name!r} is {spec.datatype} in {first_key} "
                    f"but {other.datatype} in {key}"
                )
    if not common:
        raise PipelineSpecError(f"{where}: its variants have no {kind} in common")
    return tuple(common)


def _check_takes(where: str, key: str, needed: Sequence[TensorSpec], given: Sequence[TensorSpec]) -> None:
    by_name = {t.name: t for t in given}
    for spec in needed:
        have = by_name.get(spec.name)
        if have is None:
            offered = ", ".join(_describe(t) for t in given)
            raise PipelineSpecError(f"{where}: {key} needs input {_describe(spec)}, which is not among {offered}")
        if have.datatype != spec.datatype:
            raise PipelineSpecError(
                f"{where}: {key} needs input {spec.name!r} as {spec.datatype}, the stage before gives {have.datatype}"
            )


def build_spec(document: PipelineSpecFile) -> PipelineSpec:
    """Check the contract between stages and work out the pipeline's signature."""
    app = document.application
    stages: list[StagePlan] = []
    given: tuple[TensorSpec, ...] = ()
    for index, stage in enumerate(app.stages, start=1):
        where = f"application {app.name!r} stage {index}"
        live = [v for v in stage.variants if v.weight > 0] or list(stage.variants)
        keys = [version_key(v.model, v.version) for v in live]
        shadows = tuple(version_key(s.model, s.version) for s in stage.shadows)
        missing = [k for k in (*keys, *shadows) if k not in document.signatures]
        if missing:
            raise PipelineSpecError(f"{where}: no signature for {', '.join(missing)} in the spec's signatures")
        signatures = [(k, document.signatures[k]) for k in keys]
        if index == 1:
            # Every variant of the first stage must take exactly the pipeline's inputs.
            given = tuple(signatures[0][1].inputs)
            for key, signature in signatures[1:]:
                if {(t.name, t.datatype) for t in signature.inputs} != {(t.name, t.datatype) for t in given}:
                    raise PipelineSpecError(f"{where}: {key} and {keys[0]} take different inputs")
        inputs: list[TensorSpec] = []
        for key, signature in signatures:
            _check_takes(where, key, signature.inputs, given)
            inputs.extend(t for t in signature.inputs if t.name not in {i.name for i in inputs})
        for key in shadows:
            _check_takes(f"{where} (shadow)", key, document.signatures[key].inputs, given)
        outputs = _common("outputs", where, signatures)
        stages.append(StagePlan(index, stage, tuple(inputs), outputs, shadows))
        given = outputs
    first = stages[0]
    signature = Signature(inputs=list(first.inputs), outputs=list(stages[-1].outputs))
    return PipelineSpec(app, tuple(stages), signature)


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
