"""``/api/v1/models``: register model versions (upload a model folder archive, or name a folder on the manager's
machine) and read them back."""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Request, Response, UploadFile

from manager_api.archives import ArchiveError, archive_manifest
from manager_api.artifacts import ArtifactStore, UploadTooLarge
from manager_api.client import link_leaving, pack_model_to_file
from manager_api.dependencies import Artifacts, ModelName, Store
from manager_api.errors import ApiProblem, not_found
from manager_api.schemas import CONDITIONAL_WRITE_RESPONSES, ModelVersionView, ModelView, RevisionQuery, ServerPath
from manager_api.settings import Settings
from manager_api.store.records import MAX_RECORD_BYTES, RecordTooLarge, Stored
from manager_api.store.topology_store import TopologyStore
from protos.topology.models import Artifact, ModelVersion, Signature
from runtimes.model_digest import manifest_digest
from runtimes.serving_config import SERVING_FILE, ServingConfig, ServingConfigError

router = APIRouter(prefix="/models", tags=["models"])


def _view(stored: Stored[ModelVersion]) -> ModelVersionView:
    return ModelVersionView(**stored.record.model_dump(), revision=stored.revision)


async def _chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(1024 * 1024):
        yield chunk


async def _register(
    model: str, chunks: AsyncIterator[bytes], store: TopologyStore, artifacts: ArtifactStore
) -> ModelVersionView:
    """Check a model folder archive, keep it in the artifact store and record the model's next version."""
    try:
        async with artifacts.staged(chunks) as upload:
            if upload.size == 0:
                raise ApiProblem(400, "the archive is empty")
            config = await asyncio.to_thread(artifacts.check, upload)
            # Before keep(), which may move the archive away. Runtimes check their folder against it before loading.
            files = await asyncio.to_thread(archive_manifest, upload.archive, upload.workdir / "manifest")
            folder = {"folder_digest": manifest_digest(files), "files": files}
            # Before keep() too: a version etcd would refuse leaves no archive behind.
            _check_record_size(model, config, upload.digest, upload.size, folder, artifacts)
            artifact = await asyncio.to_thread(artifacts.keep, upload)
            artifact = artifact.model_copy(update=folder)
    except UploadTooLarge as exc:
        raise ApiProblem(413, str(exc)) from exc
    except (ArchiveError, ServingConfigError) as exc:
        raise ApiProblem(400, str(exc)) from exc
    # A failure here (etcd unavailable: 503) leaves the kept archive: removing it is unsafe without etcd's answer
    # (docs/manager_api.md says why), and a retry of the same bytes reuses it.
    return _view(await store.register_model_version(model, config.runtime, artifact, config.signature, config.labels))


def _check_record_size(
    model: str, config: ServingConfig, digest: str, size: int, folder: dict[str, Any], artifacts: ArtifactStore
) -> None:
    """RecordTooLarge, naming what takes the room, if the version's record would not fit in etcd."""
    artifact = Artifact(digest=digest, uri=artifacts.blobs.uri(digest), size=size, **folder)
    # The version number is not known yet: a large one stands in for it (a few bytes either way).
    record = ModelVersion(
        name=model,
        version=2**31,
        runtime=config.runtime,
        artifact=artifact,
        signature=config.signature,
        labels=config.labels,
    )
    value = record.model_dump_json().encode()
    if len(value) > MAX_RECORD_BYTES:
        labels = len(json.dumps(config.labels, separators=(",", ":")))
        listing = len(json.dumps(folder["files"], separators=(",", ":")))
        signature = len(config.signature.model_dump_json())
        parts = (
            f"labels {labels} bytes, signature {signature} bytes, "
            f"the list of its {len(folder['files'])} files {listing} bytes"
        )
        raise RecordTooLarge(f"the record of model version {model}", len(value), parts)


@router.post("/{model}/versions", status_code=201, response_model=ModelVersionView)
async def register_model_version(
    model: ModelName,
    request: Request,
    store: Store,
    artifacts: Artifacts,
    archive: Annotated[
        UploadFile,
        File(description="a .tar.gz, .tar or .zip of the model folder", examples=["(bytes of tar czf - -C iris .)"]),
    ],
) -> ModelVersionView:
    """Upload a model folder (with serving.yaml at its root) as the next version of ``model``."""
    # FastAPI hands over the last of several; the others would be dropped without a word. (The form is the one
    # FastAPI already parsed: Starlette keeps it on the request.)
    given = len((await request.form()).getlist("archive"))
    if given > 1:
        raise ApiProblem(400, f"{given} files in the field archive: send one model archive per upload")
    return await _register(model, _chunks(archive), store, artifacts)


@router.post("/{model}/versions/from-path", status_code=201, response_model=ModelVersionView)
async def register_model_version_from_path(
    model: ModelName, body: ServerPath, request: Request, store: Store, artifacts: Artifacts
) -> ModelVersionView:
    """Register a model folder that is already on the manager's machine, as the next version of ``model``.

    Only folders under the manager's ``--allow-register-from`` folders (none by default): anything else is 403.
    """
    settings: Settings = request.app.state.settings
    folder = await asyncio.to_thread(_allowed_folder, body.path, settings.register_roots)
    with tempfile.TemporaryDirectory(prefix="hydro-register-") as work:
        archive = Path(work) / "model.tar.gz"
        # Packed like `hydro model push` packs it, so the same folder gives the same digest either way.
        await asyncio.to_thread(pack_model_to_file, folder, archive)
        return await _register(model, _file_chunks(archive), store, artifacts)


def _allowed_folder(path: str, roots: tuple[Path, ...]) -> Path:
    if not roots:
        raise ApiProblem(403, "registering from a server path is off: start the manager with --allow-register-from DIR")
    allowed = ", ".join(str(root) for root in roots)
    # resolve() follows links: a link inside an allowed folder that points outside it is outside.
    folder = _resolved(path)
    if not _under(folder, roots):
        raise ApiProblem(403, f"path {path!r} is outside the folders the manager may read models from: {allowed}")
    if not folder.is_dir():
        raise ApiProblem(400, f"path {path!r} is not a folder on the manager's machine")
    if not (folder / SERVING_FILE).is_file():
        raise ApiProblem(400, f"path {path!r} has no {SERVING_FILE}: it is not a model folder")
    # Packing follows links, and the packed archive can be downloaded by any token: a file that links outside
    # the allowed folders would be copied out of them.
    try:
        leaving = link_leaving(folder, roots)
    except (OSError, RuntimeError, ValueError) as exc:  # RuntimeError: a symlink loop, on Python 3.11
        raise ApiProblem(400, f"path {path!r}: a file in it cannot be resolved: {exc}") from exc
    if leaving is not None:
        file, target = leaving
        inside = file.relative_to(folder)
        raise ApiProblem(
            403, f"path {path!r}: {inside} links to {target}, outside the folders the manager may read: {allowed}"
        )
    return folder


def _resolved(path: str) -> Path:
    """``path`` with every link followed; 400 if that cannot be done (a loop of links, a NUL byte)."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # RuntimeError: a symlink loop, on Python 3.11
        raise ApiProblem(400, f"path {path!r} cannot be resolved on the manager's machine: {exc}") from exc


def _under(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as archive:
        while chunk := await asyncio.to_thread(archive.read, 1024 * 1024):
            yield chunk


@router.get("", response_model=list[ModelView])
async def list_models(store: Store) -> list[ModelView]:
    """Every model with its versions."""
    by_name: dict[str, list[ModelVersionView]] = {}
    for stored in await store.read_model_versions():
        by_name.setdefault(stored.record.name, []).append(_view(stored))
    return [ModelView(name=name, versions=versions) for name, versions in by_name.items()]


@router.get("/{model}", response_model=ModelView)
async def get_model(model: ModelName, store: Store) -> ModelView:
    versions = await store.read_model_versions(model)
    if not versions:
        raise not_found(f"model {model!r}")
    return ModelView(name=model, versions=[_view(stored) for stored in versions])


@router.get("/{model}/versions/{version}", response_model=ModelVersionView)
async def get_model_version(model: ModelName, version: int, store: Store) -> ModelVersionView:
    stored = await store.read_model_version(model, version)
    if stored is None:
        raise not_found(f"model version {model}:{version}")
    return _view(stored)


@router.get("/{model}/versions/{version}/signature", response_model=Signature)
async def get_model_version_signature(model: ModelName, version: int, store: Store) -> Signature:
    """The inputs and outputs the model version takes and gives (what its requests are checked against)."""
    stored = await store.read_model_version(model, version)
    if stored is None:
        raise not_found(f"model version {model}:{version}")
    return stored.record.signature


@router.delete("/{model}/versions/{version}", status_code=204, responses=CONDITIONAL_WRITE_RESPONSES)
async def delete_model_version(
    model: ModelName, version: int, store: Store, revision: RevisionQuery = None
) -> Response:
    """Delete a version nothing uses; 409 naming the deployment and applications that still do."""
    try:
        users = await store.delete_model_version(model, version, revision)
    except KeyError as exc:
        raise not_found(f"model version {model}:{version}") from exc
    if users:
        raise ApiProblem(409, f"model version {model}:{version} is in use by {', '.join(users)}; remove those first")
    return Response(status_code=204)
