"""`hydro apply` manifests: YAML documents describing models, deployments and applications, checked offline.

A document is ``{apiVersion: hydro.serving/v1, kind, metadata: {name}, spec}``; the specs follow the REST API's
request bodies (``manager_api.schemas``), plus what a file needs and a request does not: a Model's folder path, a
Deployment's model and version (``latest`` allowed, as in an Application's variants). Every document of every file
is checked before anything is sent, and every problem is reported as ``FILE: document N: FIELD: message``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationError

from manager_api.schemas import DeploymentSpec
from protos.topology.applications import MAX_PIPELINE_REPLICAS
from protos.topology.names import ResourceName
from protos.topology.policies import Policies

API_VERSION = "hydro.serving/v1"
#: Kinds in the order apply handles them: what a later kind names must exist first.
KINDS: tuple[str, ...] = ("Model", "Deployment", "Application")
MANIFEST_SUFFIXES = (".yaml", ".yml")


def _version_ref(value: object) -> int | Literal["latest"]:
    if value == "latest":
        return "latest"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(f"must be a version number (1, 2, ...) or 'latest', got {value!r}")


#: A version number, or the newest version registered when the manifest is applied.
VersionRef = Annotated[int | Literal["latest"], PlainValidator(_version_ref)]
NAME_RULE = "lower-case letters, digits, '-', '_' and '.', 1 to 63 characters, a letter or digit at both ends"


class ManifestError(ValueError):
    """One or more manifests are unusable; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Source:
    """Where an object was written: a file and the 1-based index of its YAML document."""

    file: Path
    document: int

    def __str__(self) -> str:
        return f"{self.file}: document {self.document}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Metadata(_Strict):
    name: ResourceName


class Envelope(_Strict):
    """What every document has; ``spec`` is checked against its kind's model afterwards."""

    apiVersion: Literal["hydro.serving/v1"]
    kind: Literal["Model", "Deployment", "Application"]
    metadata: Metadata
    spec: dict[str, Any]


class ModelSpec(_Strict):
    """A model folder (with serving.yaml), relative to the manifest file; pushed when its contents change."""

    path: str = Field(min_length=1)


class DeploymentManifestSpec(DeploymentSpec):
    """``PUT /deployments/{model}/{version}``'s body plus which model version it is about."""

    model: ResourceName | None = Field(None, description="the model; omitted: metadata.name")
    version: VersionRef = "latest"


class VariantRef(_Strict):
    model: ResourceName
    version: VersionRef
    weight: int = Field(ge=0, le=100)


class ShadowRef(_Strict):
    model: ResourceName
    version: VersionRef


class StageRef(_Strict):
    variants: list[VariantRef] = Field(min_length=1)
    shadows: list[ShadowRef] = Field(default_factory=list)


class ApplicationManifestSpec(_Strict):
    """``PUT /applications/{name}``'s body, with ``latest`` allowed as a variant's or shadow's version."""

    stages: list[StageRef] = Field(min_length=1)
    pipeline_replicas: int = Field(default=1, ge=1, le=MAX_PIPELINE_REPLICAS)


@dataclass(frozen=True)
class ModelObject:
    source: Source
    name: str
    folder: Path

    kind = "Model"


@dataclass(frozen=True)
class DeploymentObject:
    source: Source
    name: str
    model: str
    version: int | Literal["latest"]
    replicas: int
    policies: Policies | None

    kind = "Deployment"


@dataclass(frozen=True)
class ApplicationObject:
    source: Source
    name: str
    stages: tuple[StageRef, ...]
    pipeline_replicas: int = 1

    kind = "Application"


ManifestObject = ModelObject | DeploymentObject | ApplicationObject


def manifest_files(paths: Iterable[Path]) -> list[Path]:
    """Files named on the command line, and every *.yaml / *.yml in directories named there (sorted)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in MANIFEST_SUFFIXES)
            if not found:
                raise ManifestError([f"{path}: no *.yaml or *.yml files in this directory"])
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ManifestError([f"{path}: no such file or directory"])
    return files


def _field_errors(source: Source, prefix: str, error: ValidationError) -> list[str]:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in (prefix, *item["loc"]) if part != "")
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "string_pattern_mismatch":
            message = f"must be {NAME_RULE}"
        if item["type"] not in ("missing", "extra_forbidden", "value_error") and "input" in item:
            message += f" (got {item['input']!r})"[:120]
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        lines.append(f"{source}: {where or 'document'}: {message}")
    return lines


def _weights(source: Source, spec: ApplicationManifestSpec) -> list[str]:
    problems = []
    for index, stage in enumerate(spec.stages):
        total = sum(v.weight for v in stage.variants)
        if total != 100:
            weights = " + ".join(str(v.weight) for v in stage.variants)
            problems.append(f"{source}: spec.stages.{index}.variants: weights must sum to 100, got {weights} = {total}")
    return problems


def parse_document(source: Source, raw: object) -> tuple[ManifestObject | None, list[str]]:
    """One YAML document as an object, or the problems that make it unusable."""
    if not isinstance(raw, dict):
        return None, [f"{source}: expected a mapping with apiVersion, kind, metadata and spec"]
    kind = raw.get("kind")
    if isinstance(kind, str) and kind not in KINDS:
        return None, [f"{source}: kind: unknown kind {kind!r}; expected one of {', '.join(KINDS)}"]
    try:
        envelope = Envelope.model_validate(raw)
    except ValidationError as exc:
        return None, _field_errors(source, "", exc)
    name = envelope.metadata.name
    try:
        if envelope.kind == "Model":
            model = ModelSpec.model_validate(envelope.spec)
            folder = (source.file.parent / model.path).resolve()
            if not (folder / "serving.yaml").is_file():
                return None, [f"{source}: spec.path: {folder} is not a model folder (no serving.yaml in it)"]
            return ModelObject(source, name, folder), []
        if envelope.kind == "Deployment":
            deployment = DeploymentManifestSpec.model_validate(envelope.spec)
            return (
                DeploymentObject(
                    source,
                    name,
                    deployment.model or name,
                    deployment.version,
                    deployment.replicas,
                    deployment.policies,
                ),
                [],
            )
        application = ApplicationManifestSpec.model_validate(envelope.spec)
        problems = _weights(source, application)
        if problems:
            return None, problems
        return ApplicationObject(source, name, tuple(application.stages), application.pipeline_replicas), []
    except ValidationError as exc:
        return None, _field_errors(source, "spec", exc)


def parse_file(path: Path) -> tuple[list[ManifestObject], list[str]]:
    """Every document of one YAML file (empty documents are skipped, as kubectl does)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        return [], [f"{path}: cannot read: {exc}"]
    objects: list[ManifestObject] = []
    problems: list[str] = []
    index = 0
    try:
        for raw in yaml.safe_load_all(text):
            index += 1
            if raw is None:
                continue
            parsed, found = parse_document(Source(path, index), raw)
            problems.extend(found)
            if parsed is not None:
                objects.append(parsed)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown position"
        reason = getattr(exc, "problem", None) or str(exc)
        problems.append(f"{path}: document {index + 1}: not valid YAML at {where}: {reason}")
    return objects, problems


def load_manifests(paths: Sequence[Path]) -> list[ManifestObject]:
    """Every object in ``paths`` in apply order (models, deployments, applications; file order within a kind).

    Raises ManifestError listing every problem found, in every file, so one run shows them all.
    """
    objects: list[ManifestObject] = []
    problems: list[str] = []
    for path in manifest_files(paths):
        found, file_problems = parse_file(path)
        objects.extend(found)
        problems.extend(file_problems)
    first_seen: dict[tuple[str, str], Source] = {}
    for obj in objects:
        key = (obj.kind, obj.name)
        if key in first_seen:
            again = f"{obj.kind} {obj.name!r} is also defined at {first_seen[key]}"
            problems.append(f"{obj.source}: metadata.name: {again}")
        else:
            first_seen[key] = obj.source
    if not objects and not problems:
        problems.append(f"no objects in {', '.join(str(p) for p in paths)}")
    if problems:
        raise ManifestError(problems)
    return sorted(objects, key=lambda obj: KINDS.index(obj.kind))
