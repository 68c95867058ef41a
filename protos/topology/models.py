"""``models/{model}/{version}``: a registered model version, its signature and its artifact."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from protos.topology.records import Record, now_iso

Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]
DATATYPES: tuple[str, ...] = Datatype.__args__  # type: ignore[attr-defined]


class TensorSpec(BaseModel):
    """One input or output of a model signature. ``-1`` in the shape is a wildcard dimension."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, max_length=256)
    datatype: Datatype
    shape: list[int]

    @field_validator("shape", mode="before")
    @classmethod
    def _no_booleans(cls, shape: object) -> object:
        # Pydantic's int takes true as 1: a serving.yaml shape of [true, 4] would quietly be [1, 4].
        if isinstance(shape, list | tuple) and any(isinstance(dim, bool) for dim in shape):
            raise ValueError("dimensions are integers (a size, or -1 for any size), not true/false")
        return shape

    @field_validator("shape")
    @classmethod
    def _dims(cls, shape: list[int]) -> list[int]:
        for dim in shape:
            if dim < -1 or dim == 0:
                raise ValueError(f"dimension {dim} is not allowed: use a positive size or -1 for any size")
        return shape


class Signature(BaseModel):
    """Inputs and outputs of a model; requests are validated against it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)

    @field_validator("inputs", "outputs")
    @classmethod
    def _unique(cls, specs: list[TensorSpec]) -> list[TensorSpec]:
        names = [s.name for s in specs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"tensor names must be unique, repeated: {', '.join(dupes)}")
        return specs


class Artifact(BaseModel):
    """Where a model version's files are: a content-addressed archive of the model folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    digest: str = Field(pattern=r"^sha256:[0-9a-f]{64}$", description="sha256 of the archive as uploaded")
    uri: str
    size: int = Field(ge=0)
    # Records registered before runtimes verified their folders have neither: they deploy unverified.
    folder_digest: str | None = Field(
        default=None,
        pattern=r"^sha256:[0-9a-f]{64}$",
        description="sha256 of the unpacked model folder's manifest (runtimes/model_digest.py); runtimes check it",
    )
    files: dict[str, str] | None = Field(
        default=None,
        description="the folder's manifest: relative path -> sha256 hex; lets a runtime name the file that differs",
    )


class ModelVersion(Record):
    """``models/{name}/{version}``: an immutable, registered model version."""

    name: str
    version: int = Field(ge=1)
    runtime: str
    artifact: Artifact
    signature: Signature
    labels: dict[str, str] = Field(default_factory=dict)
    created_at: str = Field(default_factory=now_iso)
