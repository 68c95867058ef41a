"""Whether the model versions of an application fit together, checked when the application is written.

Two rules. The variants of one stage are interchangeable (traffic moves between them by weight), so each must take
the inputs and give the outputs the stage's first variant does. And each stage's inputs must be satisfied by the
previous stage's outputs: a tensor of the same name and datatype, whose shape fits (same rank; -1 matches any
size). A pipeline then takes the first stage's inputs and gives the last stage's outputs.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from protos.topology import Signature, TensorSpec


class ContractError(ValueError):
    """The application's model versions do not fit together; the message names the field and both tensors."""


@dataclass(frozen=True)
class StageModel:
    """One model version of a stage, with where the application names it (e.g. ``stages[1].variants[0]``)."""

    where: str
    model: str
    version: int
    signature: Signature


def shapes_fit(given: Sequence[int], wanted: Sequence[int]) -> bool:
    """Whether a tensor of shape ``given`` can be fed where ``wanted`` is expected (-1 on either side is any size)."""
    if len(given) != len(wanted):
        return False
    return all(g == -1 or w == -1 or g == w for g, w in zip(given, wanted, strict=True))


def describe(spec: TensorSpec) -> str:
    """``name (DATATYPE [shape])``, as error messages show a tensor."""
    return f"{spec.name} ({spec.datatype} [{', '.join(str(d) for d in spec.shape)}])"


def _label(model: StageModel) -> str:
    return f"{model.where} ({model.model}:{model.version})"


def _same_tensors(kind: str, reference: StageModel, other: StageModel) -> None:
    mine = {s.name: s for s in getattr(reference.signature, kind)}
    theirs = {s.name: s for s in getattr(other.signature, kind)}
    if mine.keys() != theirs.keys():
        raise ContractError(
            f"{_label(other)}: its {kind} are {', '.join(sorted(theirs))}, but {_label(reference)} in the same stage "
            f"has {', '.join(sorted(mine))}; the variants of a stage must be interchangeable"
        )
    for name, spec in mine.items():
        other_spec = theirs[name]
        if spec.datatype != other_spec.datatype or not shapes_fit(other_spec.shape, spec.shape):
            raise ContractError(
                f"{_label(other)}: {kind[:-1]} {describe(other_spec)} differs from {describe(spec)} of "
                f"{_label(reference)} in the same stage; the variants of a stage must be interchangeable"
            )


def _feeds(previous: StageModel, following: StageModel) -> None:
    outputs = {s.name: s for s in previous.signature.outputs}
    for wanted in following.signature.inputs:
        given = outputs.get(wanted.name)
        if given is None:
            offered = ", ".join(describe(s) for s in previous.signature.outputs)
            raise ContractError(
                f"{_label(following)}: input {describe(wanted)} is not among the outputs of the stage before, "
                f"{_label(previous)}: {offered}"
            )
        if given.datatype != wanted.datatype:
            raise ContractError(
                f"{_label(following)}: input {describe(wanted)} gets {describe(given)} from {_label(previous)}: "
                f"datatype {given.datatype} is not {wanted.datatype}"
            )
        if not shapes_fit(given.shape, wanted.shape):
            raise ContractError(
                f"{_label(following)}: input {describe(wanted)} gets {describe(given)} from {_label(previous)}: "
                "the shapes do not fit (same number of dimensions, equal sizes where neither is -1)"
            )


def check_application(stages: Sequence[Sequence[StageModel]]) -> None:
    """Raise ContractError for the first model version that does not fit; ``stages`` are each stage's variants
    (and shadows), in order, each stage non-empty."""
    for variants in stages:
        reference = variants[0]
        for other in variants[1:]:
            _same_tensors("inputs", reference, other)
            _same_tensors("outputs", reference, other)
    for previous, following in itertools.pairwise(stages):
        _feeds(previous[0], following[0])
