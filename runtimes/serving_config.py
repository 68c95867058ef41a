"""``serving.yaml``: what a model folder declares about itself (runtime, files, signature).

Read by the manager when a model version is registered (to refuse bad folders before anything is stored) and
by the runtime when it loads the folder.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from protos.topology.models import Signature
from protos.topology.names import NAME_PATTERN

SERVING_FILE = "serving.yaml"

#: Runtime kinds this version can serve; each has a module in runtimes/.
RUNTIME_KINDS = ("python", "sklearn", "onnx", "xgboost", "lightgbm", "tensorflow", "spark")


class ServingConfigError(ValueError):
    """serving.yaml is missing, unreadable or wrong; the message names the offending field."""


class WarmupTensor(BaseModel):
    """One input of the warm-up request, as a JSON request carries it (its datatype is the signature's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    shape: list[int]
    data: list[Any]


class ServingConfig(BaseModel):
    """The parsed ``serving.yaml`` of a model folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    #: The model's name when its folder is discovered by `hydro up --models-dir` (default: the folder's name).
    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    runtime: str
    files: list[str] = Field(default_factory=list)
    entrypoint: str | None = None
    signature: Signature
    labels: dict[str, str] = Field(default_factory=dict)
    #: The request the runtime predicts once before it reports ready, one entry per signature input; without it,
    #: zeros (empty strings for BYTES), which a model may refuse (a OneHotEncoder that knows no "" category).
    warmup: dict[str, WarmupTensor] | None = None

    @field_validator("runtime")
    @classmethod
    def _known_runtime(cls, runtime: str) -> str:
        if runtime not in RUNTIME_KINDS:
            raise ValueError(f"unknown runtime {runtime!r}; known runtimes: {', '.join(RUNTIME_KINDS)}")
        return runtime

    @model_validator(mode="after")
    def _warmup_names_the_inputs(self) -> ServingConfig:
        if self.warmup is not None:
            expected = [spec.name for spec in self.signature.inputs]
            if sorted(self.warmup) != sorted(expected):
                raise ValueError(
                    f"warmup must give every signature input once ({', '.join(expected)}), "
                    f"not {', '.join(self.warmup) or 'none'}"
                )
        return self

    @field_validator("files")
    @classmethod
    def _relative_files(cls, files: list[str]) -> list[str]:
        for name in files:
            path = PurePosixPath(name)
            if path.is_absolute() or ".." in path.parts or not name:
                raise ValueError(f"file {name!r} must be a relative path inside the model folder")
        return files


def _format_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "serving.yaml"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def parse_serving_config(text: str) -> ServingConfig:
    """Parse serving.yaml text; ServingConfigError names the field that is wrong."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # One line (PyYAML's own text spans several, with a drawing of the line): where, then what.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        reason = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise ServingConfigError(f"serving.yaml is not valid YAML{where}: {reason}") from exc
    if not isinstance(raw, dict):
        raise ServingConfigError("serving.yaml must be a mapping with runtime, files and signature")
    try:
        config = ServingConfig.model_validate(raw)
    except ValidationError as exc:
        raise ServingConfigError(f"serving.yaml: {_format_errors(exc)}") from exc
    if config.runtime == "python" and not config.entrypoint:
        raise ServingConfigError("serving.yaml: entrypoint: required for the python runtime (module:attribute)")
    return config


def load_serving_config(model_dir: Path) -> ServingConfig:
    """Read and check ``model_dir/serving.yaml``, including that every listed file exists."""
    path = model_dir / SERVING_FILE
    if not path.is_file():
        raise ServingConfigError(f"{SERVING_FILE} not found in the model folder")
    config = parse_serving_config(path.read_text(encoding="utf-8", errors="replace"))
    # A listed entry may be a folder: TensorFlow SavedModels and Spark ML models are directories.
    missing = [name for name in config.files if not (model_dir / name).exists()]
    if missing:
        raise ServingConfigError(f"files listed in serving.yaml are missing from the folder: {', '.join(missing)}")
    return config
