"""`hydro apply -f FILE|DIR`: make the manager match YAML manifests, printing created/configured/unchanged.

Everything is checked before the first write: the manifests offline (manager_api.manifests), then every model
version they refer to against the manager. Objects are applied models first, then deployments, then
applications, so ``version: latest`` sees the versions pushed by the same apply.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.markup import escape

from manager_api.cli.connection import ApiOption, DataDirOption, TokenOption, manager
from manager_api.cli.output import OutputFormat, OutputOption, emit, out
from manager_api.cli.push import pack_with_progress, upload_with_progress
from manager_api.cli.root import app
from manager_api.client import ApiError, ManagerClient
from manager_api.manifests import (
    ApplicationObject,
    DeploymentObject,
    ManifestError,
    ManifestObject,
    ModelObject,
    load_manifests,
)
from protos.topology.policies import Policies

Action = Literal["created", "configured", "unchanged"]


@dataclass(frozen=True)
class Outcome:
    """What apply did to one object."""

    kind: str
    name: str
    action: Action
    detail: str

    def line(self) -> str:
        return f"{self.kind.lower()}/{self.name} {self.action} ({self.detail})"


class Applier:
    """Applies manifest objects through one ManagerClient, remembering each model's versions as it goes."""

    def __init__(self, client: ManagerClient, workdir: Path) -> None:
        self._client = client
        self._workdir = workdir
        self._versions: dict[str, list[dict[str, Any]]] = {}

    def versions(self, model: str) -> list[dict[str, Any]]:
        """The model's registered versions, oldest first (none if the model is unknown)."""
        if model not in self._versions:
            try:
                found = self._client.get_model(model)["versions"]
            except ApiError as exc:
                if exc.status != 404:
                    raise
                found = []
            self._versions[model] = sorted(found, key=lambda v: int(v["version"]))
        return self._versions[model]

    def resolve(self, model: str, version: int | Literal["latest"]) -> int:
        if version != "latest":
            return version
        registered = self.versions(model)
        if not registered:
            raise ApiError(404, f"model {model!r} has no versions, so 'latest' means nothing")
        return int(registered[-1]["version"])

    def check_references(self, objects: list[ManifestObject]) -> list[str]:
        """Problems with the model versions that deployments and applications name, found before any write."""
        pushed = {obj.name for obj in objects if isinstance(obj, ModelObject)}
        problems = []
        for obj in objects:
            refs: list[tuple[str, str, int | Literal["latest"]]] = []
            if isinstance(obj, DeploymentObject):
                refs.append(("spec", obj.model, obj.version))
            elif isinstance(obj, ApplicationObject):
                for s, stage in enumerate(obj.stages):
                    refs.extend(
                        (f"spec.stages.{s}.variants.{v}", ref.model, ref.version)
                        for v, ref in enumerate(stage.variants)
                    )
                    refs.extend(
                        (f"spec.stages.{s}.shadows.{v}", ref.model, ref.version) for v, ref in enumerate(stage.shadows)
                    )
            for field, model, version in refs:
                known = {int(v["version"]) for v in self.versions(model)}
                if version == "latest" and (known or model in pushed):
                    continue
                if version != "latest" and version in known:
                    continue
                wanted = f"{model}:{version}" if version != "latest" else f"any version of {model}"
                hint = "" if model in pushed else " (and no Model manifest pushes it)"
                problems.append(f"{obj.source}: {field}: {wanted} is not registered{hint}")
        return problems

    def apply(self, obj: ManifestObject) -> Outcome:
        if isinstance(obj, ModelObject):
            return self.apply_model(obj)
        if isinstance(obj, DeploymentObject):
            return self.apply_deployment(obj)
        return self.apply_application(obj)

    def apply_model(self, obj: ModelObject) -> Outcome:
        """Push the folder unless the latest version holds the very same archive."""
        packed = pack_with_progress(obj.folder, self._workdir)
        registered = self.versions(obj.name)
        if registered and registered[-1]["artifact"]["digest"] == packed.digest:
            return Outcome("Model", obj.name, "unchanged", f"version {registered[-1]['version']}")
        record = upload_with_progress(self._client, obj.name, packed)
        registered.append(record)
        action: Action = "configured" if len(registered) > 1 else "created"
        return Outcome("Model", obj.name, action, f"version {record['version']}")

    def apply_deployment(self, obj: DeploymentObject) -> Outcome:
        version = self.resolve(obj.model, obj.version)
        detail = f"{obj.model}:{version}, {obj.replicas} replica{'' if obj.replicas == 1 else 's'}"
        try:
            current: dict[str, Any] | None = self._client.get_deployment(obj.model, version)
        except ApiError as exc:
            if exc.status != 404:
                raise
            current = None
        # Omitted policies keep the current ones, as the API does with an omitted "policies".
        if (
            current is not None
            and current["replicas"] == obj.replicas
            and (obj.policies is None or Policies.model_validate(current["policies"]) == obj.policies)
        ):
            return Outcome("Deployment", obj.name, "unchanged", detail)
        policies = obj.policies.model_dump(mode="json") if obj.policies is not None else None
        # With the revision just read: a change someone made since is a 409, not silently overwritten.
        revision = int(current["revision"]) if current is not None else 0
        self._client.deploy(obj.model, version, obj.replicas, policies, revision=revision)
        return Outcome("Deployment", obj.name, "created" if current is None else "configured", detail)

    def apply_application(self, obj: ApplicationObject) -> Outcome:
        stages: list[dict[str, Any]] = []
        for stage in obj.stages:
            resolved: dict[str, Any] = {
                "variants": [
                    {"model": v.model, "version": self.resolve(v.model, v.version), "weight": v.weight}
                    for v in stage.variants
                ],
                "shadows": [{"model": v.model, "version": self.resolve(v.model, v.version)} for v in stage.shadows],
            }
            stages.append(resolved)
        detail = " -> ".join(
            ", ".join(f"{v['model']}:{v['version']} {v['weight']}%" for v in stage["variants"]) for stage in stages
        )
        try:
            current: dict[str, Any] | None = self._client.get_application(obj.name)
        except ApiError as exc:
            if exc.status != 404:
                raise
            current = None
        if (
            current is not None
            and _stages_of(current) == stages
            and current.get("pipeline_replicas", 1) == obj.pipeline_replicas
        ):
            return Outcome("Application", obj.name, "unchanged", detail)
        revision = int(current["revision"]) if current is not None else 0
        self._client.put_application_stages(
            obj.name, stages, pipeline_replicas=obj.pipeline_replicas, revision=revision
        )
        return Outcome("Application", obj.name, "created" if current is None else "configured", detail)


def _stages_of(application: dict[str, Any]) -> list[dict[str, Any]]:
    """The part of a stored application a manifest sets (records may carry more, e.g. timestamps)."""
    return [
        {
            "variants": [
                {"model": v["model"], "version": v["version"], "weight": v["weight"]} for v in stage["variants"]
            ],
            "shadows": [{"model": v["model"], "version": v["version"]} for v in stage.get("shadows", [])],
        }
        for stage in application["stages"]
    ]


@app.command()
def apply(
    files: Annotated[
        list[Path],
        typer.Option("--filename", "-f", help="A manifest file, or a directory of *.yaml / *.yml; repeatable."),
    ],
    output: OutputOption = OutputFormat.table,
    api: ApiOption = None,
    token: TokenOption = None,
    data_dir: DataDirOption = Path(".hydro"),
) -> None:
    """Create or update models, deployments and applications from YAML manifests (apiVersion hydro.serving/v1)."""
    outcomes: list[Outcome] = []
    with manager(api, token, data_dir) as client, tempfile.TemporaryDirectory(prefix="hydro-apply-") as workdir:
        objects = load_manifests(files)
        applier = Applier(client, Path(workdir))
        problems = applier.check_references(objects)
        if problems:
            raise ManifestError(problems)
        for obj in objects:
            try:
                outcome = applier.apply(obj)
            except ApiError as exc:
                # Say which object the API refused; what was applied before it stays applied.
                raise ApiError(
                    exc.status, f"{obj.source}: {obj.kind} {obj.name!r}: {exc.message}", foreign=exc.foreign
                ) from exc
            outcomes.append(outcome)
            if output is OutputFormat.table:
                out.print(escape(outcome.line()))
    if output is not OutputFormat.table:
        emit([asdict(outcome) for outcome in outcomes], output)
