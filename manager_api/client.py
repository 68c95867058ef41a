"""A small client of the manager's REST API, used by the hydro CLI, the demo and the tests."""

from __future__ import annotations

import gzip
import hashlib
import io
import secrets
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

#: Called with the number of bytes done so far (packing: bytes of files read; upload: bytes of archive sent).
Progress = Callable[[int], None]

_CHUNK = 1024 * 1024


class ApiError(RuntimeError):
    """The manager answered with an error; ``status`` and the server's message are kept.

    ``foreign`` is true when the body was not the API's ``{"error": ...}`` JSON: something other than the manager
    (a proxy's or another server's page) answered at the URL.
    """

    def __init__(self, status: int, message: str, *, foreign: bool = False) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.foreign = foreign


def model_files(folder: Path) -> list[Path]:
    """The files a model archive holds, in archive order (sorted paths); caches skipped."""
    return [
        path
        for path in sorted(folder.rglob("*"))
        if "__pycache__" not in path.relative_to(folder).parts and path.is_file()
    ]


def link_leaving(folder: Path, roots: tuple[Path, ...]) -> tuple[Path, Path] | None:
    """The first file packing ``folder`` would copy that resolves outside every one of ``roots``, with its target.

    Packing follows links, and a packed archive can be downloaded by any token: a file linking out of the folders
    the manager may read would be copied out of them. ``roots`` must be resolved. None: every file stays inside.
    Raises OSError, RuntimeError (a loop of links, Python 3.11) or ValueError (a NUL byte) if a path cannot be
    resolved.
    """
    for file in model_files(folder):
        target = file.resolve()
        if not any(target.is_relative_to(root) for root in roots):
            return file, target
    return None


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes and counts what goes through it to ``out``."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self.sha.update(chunk)
        self.size += len(chunk)
        self._out.write(chunk)
        return len(chunk)


class _CountingReader:
    """A file reader that reports the running total of bytes read (tarfile copies a file in chunks)."""

    def __init__(self, source: IO[bytes], start: int, on_progress: Progress | None) -> None:
        self._source = source
        self.done = start
        self._on_progress = on_progress

    def read(self, size: int = -1) -> bytes:
        chunk = self._source.read(size)
        self.done += len(chunk)
        if self._on_progress is not None:
            self._on_progress(self.done)
        return chunk


def write_model_archive(folder: Path, out: IO[bytes], on_progress: Progress | None = None) -> tuple[str, int]:
    """Write a reproducible .tar.gz of ``folder`` to ``out``; return its ``sha256:...`` digest and size.

    Reproducible: the same files give the same bytes (no timestamps, owners or gzip mtime), so the digest the
    manager stores can be compared with a local folder to tell whether it changed.
    """
    hashing = _HashingWriter(out)
    done = 0
    with (
        gzip.GzipFile(fileobj=hashing, mode="wb", mtime=0, filename="") as compressed,
        tarfile.open(fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT) as archive,
    ):
        for path in model_files(folder):
            info = tarfile.TarInfo(path.relative_to(folder).as_posix())
            file_stat = path.stat()
            info.size = file_stat.st_size
            info.mode = 0o755 if file_stat.st_mode & stat.S_IXUSR else 0o644
            with path.open("rb") as source:
                archive.addfile(info, _CountingReader(source, done, on_progress))  # type: ignore[arg-type]
            done += info.size
    return f"sha256:{hashing.sha.hexdigest()}", hashing.size


def pack_model_folder(folder: Path) -> bytes:
    """A .tar.gz of the model folder's files (serving.yaml at the root), skipping caches."""
    buffer = io.BytesIO()
    write_model_archive(folder, buffer)
    return buffer.getvalue()


@dataclass(frozen=True)
class PackedModel:
    """A model folder packed into a file, ready to upload."""

    path: Path
    digest: str
    size: int


def pack_model_to_file(folder: Path, path: Path, on_progress: Progress | None = None) -> PackedModel:
    """Pack ``folder`` into the file ``path`` (see write_model_archive)."""
    with path.open("wb") as out:
        digest, size = write_model_archive(folder, out, on_progress)
    return PackedModel(path=path, digest=digest, size=size)


def _multipart_stream(
    field: str, filename: str, packed: PackedModel, on_progress: Progress | None
) -> tuple[str, int, Iterator[bytes]]:
    """A multipart/form-data body of one file read in chunks: (content type, length, chunks)."""
    boundary = secrets.token_hex(16)
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        "Content-Type: application/gzip\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def chunks() -> Iterator[bytes]:
        yield head
        sent = 0
        with packed.path.open("rb") as source:
            while chunk := source.read(_CHUNK):
                yield chunk
                # httpx asks for the next chunk once this one is written to the socket.
                sent += len(chunk)
                if on_progress is not None:
                    on_progress(sent)
        yield tail

    return f"multipart/form-data; boundary={boundary}", len(head) + packed.size + len(tail), chunks()


def _raise_for_error(response: httpx.Response) -> None:
    """ApiError with the body's ``error`` text (or the raw body, from something that is not the manager)."""
    if not response.is_error:
        return
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "error" in body:
        raise ApiError(response.status_code, str(body["error"]))
    raise ApiError(response.status_code, response.text.strip() or response.reason_phrase, foreign=True)


class ManagerClient:
    """Typed calls to /api/v1; every error becomes ApiError with the server's message.

    Connection failures are not wrapped: they surface as ``httpx.TransportError`` (``httpx.ConnectError`` when
    nothing listens), so callers can tell "the manager said no" from "there is no manager".
    """

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 60.0) -> None:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url + "/api/v1", headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ManagerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        _raise_for_error(response)
        return response.json() if response.content else None

    def health(self) -> dict[str, Any]:
        """``GET /healthz`` (no token needed): ``{"status": "ok", "etcd": "ok"}``; ApiError 503 if etcd is down."""
        response = self._http.get(self.base_url + "/healthz")
        _raise_for_error(response)
        result: dict[str, Any] = response.json()
        return result

    # Models

    def push_model(self, name: str, folder: Path) -> dict[str, Any]:
        """Upload a model folder as a new version of ``name``; returns the registered version."""
        archive = pack_model_folder(folder)
        files = {"archive": (f"{name}.tar.gz", archive, "application/gzip")}
        result: dict[str, Any] = self._call("POST", f"/models/{name}/versions", files=files)
        return result

    def upload_model(self, name: str, packed: PackedModel, on_progress: Progress | None = None) -> dict[str, Any]:
        """Stream a packed model folder as a new version of ``name``, reporting bytes sent; returns the version."""
        content_type, length, body = _multipart_stream("archive", f"{name}.tar.gz", packed, on_progress)
        headers = {"content-type": content_type, "content-length": str(length)}
        result: dict[str, Any] = self._call("POST", f"/models/{name}/versions", content=body, headers=headers)
        return result

    def list_models(self) -> list[dict[str, Any]]:
        """Every model with its versions: ``[{"name": ..., "versions": [...]}]``."""
        result: list[dict[str, Any]] = self._call("GET", "/models")
        return result

    def get_model(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/models/{name}")
        return result

    def get_model_version(self, name: str, version: int) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/models/{name}/versions/{version}")
        return result

    def delete_model_version(self, name: str, version: int) -> None:
        """Delete an unused version (ApiError 409 names what still uses it)."""
        self._call("DELETE", f"/models/{name}/versions/{version}")

    # Deployments

    def deploy(
        self,
        model: str,
        version: int,
        replicas: int,
        policies: dict[str, Any] | None = None,
        revision: int | None = None,
    ) -> dict[str, Any]:
        """Create or scale a deployment; ``policies`` (docs/traffic_policies.md) replace the current ones if given.
        With ``revision`` (0: must not exist yet) the write is refused with a 409 if the deployment changed since."""
        body: dict[str, Any] = {"replicas": replicas}
        if policies is not None:
            body["policies"] = policies
        if revision is not None:
            body["revision"] = revision
        result: dict[str, Any] = self._call("PUT", f"/deployments/{model}/{version}", json=body)
        return result

    def list_deployments(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/deployments")
        return result

    def get_deployment(self, model: str, version: int) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/deployments/{model}/{version}")
        return result

    def delete_deployment(self, model: str, version: int) -> None:
        self._call("DELETE", f"/deployments/{model}/{version}")

    # Applications

    def put_application(self, name: str, variants: list[tuple[str, int, int]]) -> dict[str, Any]:
        """Create or update a one-stage application from (model, version, weight) variants."""
        stages = [{"variants": [{"model": m, "version": v, "weight": w} for m, v, w in variants]}]
        return self.put_application_stages(name, stages)

    def put_application_stages(
        self,
        name: str,
        stages: list[dict[str, Any]],
        pipeline_replicas: int | None = None,
        revision: int | None = None,
    ) -> dict[str, Any]:
        """Create or replace an application from its stages, as ``PUT /applications/{name}`` takes them; with
        ``revision`` (0: must not exist yet) a 409 if it changed since."""
        body: dict[str, Any] = {"stages": stages}
        if pipeline_replicas is not None:
            body["pipeline_replicas"] = pipeline_replicas
        if revision is not None:
            body["revision"] = revision
        result: dict[str, Any] = self._call("PUT", f"/applications/{name}", json=body)
        return result

    def list_applications(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/applications")
        return result

    def get_application(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/applications/{name}")
        return result

    def delete_application(self, name: str) -> None:
        self._call("DELETE", f"/applications/{name}")

    # Proxies

    def list_proxies(self) -> list[dict[str, Any]]:
        """Envoys connected to xds_control, with what they acknowledged and their last rejection."""
        result: list[dict[str, Any]] = self._call("GET", "/proxies")
        return result

    def get_proxy(self, node_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/proxies/{node_id}")
        return result
