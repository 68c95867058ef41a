"""Whether an application's model versions fit together: one rule for the manager (checked when an application is
written) and the pipeline runtime (checked again before it serves).

A stage is called as one: the same request reaches whichever variant Envoy picks, and a copy reaches each shadow.
So every variant and shadow of a stage must take the same inputs (names and datatypes; shapes that fit). What a
stage gives the next one is what all its variants give: the outputs they share (the same datatype under the same
name; a variant may give more). Each stage's inputs must be among the previous stage's outputs with the same
datatype and a shape that fits (same rank; -1 matches any size). A pipeline takes the first stage's inputs and
gives the last stage's shared outputs. Every variant counts, also at weight 0: a weight change is not checked again
by a running pipeline.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from protos.topology.applications import Application
from protos.topology.models import Signature, TensorSpec


class ContractError(ValueError):
    """The application's model versions do not fit together; the message names the stage, the model version and
    the tensors."""


@dataclass(frozen=True)
class StageContract:
    """What one stage takes and what it gives the next."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class Contract:
    """A checked application: each stage's tensors, and the application's own signature."""

    stages: tuple[StageContract, ...]
    signature: Signature


def version_key(model: str, version: int) -> str:
    """How a model version is named in contracts, specs and headers: ``model:version``."""
    return f"{model}:{version}"


def shapes_fit(given: Sequence[int], wanted: Sequence[int]) -> bool:
    """Whether a tensor of shape ``given`` can be fed where ``wanted`` is expected (-1 on either side is any size)."""
    if len(given) != len(wanted):
        return False
    return all(g == -1 or w == -1 or g == w for g, w in zip(given, wanted, strict=True))


def describe(spec: TensorSpec) -> str:
    """``name (DATATYPE [shape])``, as error messages show a tensor."""
    return f"{spec.name} ({spec.datatype} [{', '.join(str(d) for d in spec.shape)}])"


def _same_inputs(
    where: str, reference: str, mine: Sequence[TensorSpec], key: str, theirs: Sequence[TensorSpec]
) -> None:
    expected = {t.name: t for t in mine}
    given = {t.name: t for t in theirs}
    if expected.keys() != given.keys():
        raise ContractError(
            f"{where}: {key} takes {', '.join(sorted(given))} but {reference} takes {', '.join(sorted(expected))}; "
            "every variant and shadow of a stage gets the same request"
        )
    for name, spec in expected.items():
        other = given[name]
        if other.datatype != spec.datatype or not shapes_fit(other.shape, spec.shape):
            raise ContractError(
                f"{where}: {key} takes {describe(other)} but {reference} takes {describe(spec)}; "
                "every variant and shadow of a stage gets the same request"
            )


def _shared_outputs(where: str, signatures: Sequence[tuple[str, Signature]]) -> tuple[TensorSpec, ...]:
    first_key, first = signatures[0]
    shared = list(first.outputs)
    for key, signature in signatures[1:]:
        theirs = {t.name: t for t in signature.outputs}
        for spec in list(shared):
            other = theirs.get(spec.name)
            if other is None:
                shared.remove(spec)
            elif other.datatype != spec.datatype or not shapes_fit(other.shape, spec.shape):
                raise ContractError(
                    f"{where}: output {describe(spec)} of {first_key} is {describe(other)} in {key}; "
                    "variants of a stage must agree on the outputs they share"
                )
    if not shared:
        raise ContractError(f"{where}: its variants {', '.join(k for k, _ in signatures)} share no output")
    return tuple(shared)


def _fed(where: str, key: str, needed: Sequence[TensorSpec], given: Sequence[TensorSpec], source: str) -> None:
    by_name = {t.name: t for t in given}
    for spec in needed:
        have = by_name.get(spec.name)
        if have is None:
            offered = ", ".join(describe(t) for t in given)
            raise ContractError(f"{where}: {key} needs input {describe(spec)}, which {source} does not give: {offered}")
        if have.datatype != spec.datatype:
            raise ContractError(
                f"{where}: {key} needs input {describe(spec)}, {source} gives {describe(have)}: "
                f"datatype {have.datatype} is not {spec.datatype}"
            )
        if not shapes_fit(have.shape, spec.shape):
            raise ContractError(
                f"{where}: {key} needs input {describe(spec)}, {source} gives {describe(have)}: the shapes do not "
                "fit (same number of dimensions, equal sizes where neither is -1)"
            )


def check_application(application: Application, signatures: Mapping[str, Signature]) -> Contract:
    """Check the application against its model versions' signatures (by ``model:version``); ContractError names
    the first stage and model version that does not fit. Stages are counted from 1, as the pipeline's errors and
    headers count them."""
    stages: list[StageContract] = []
    previous: tuple[TensorSpec, ...] = ()
    for index, stage in enumerate(application.stages, start=1):
        where = f"stage {index}"
        variants = [version_key(v.model, v.version) for v in stage.variants]
        shadows = [version_key(s.model, s.version) for s in stage.shadows]
        missing = [k for k in (*variants, *shadows) if k not in signatures]
        if missing:
            raise ContractError(f"{where}: no signature for {', '.join(missing)}")
        reference = variants[0]
        inputs = tuple(signatures[reference].inputs)
        for key in itertools.chain(variants[1:], shadows):
            _same_inputs(where, reference, inputs, key, signatures[key].inputs)
        if index > 1:
            _fed(where, reference, inputs, previous, f"stage {index - 1}")
        outputs = _shared_outputs(where, [(k, signatures[k]) for k in variants])
        stages.append(StageContract(inputs, outputs))
        previous = outputs
    signature = Signature(inputs=list(stages[0].inputs), outputs=list(stages[-1].outputs))
    return Contract(tuple(stages), signature)
