"""A small client of the manager's REST API, used by the hydro CLI, the demo and the tests."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import httpx


class ApiError(RuntimeError):
    """The manager answered with an error; ``status`` and the server's message are kept."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def pack_model_folder(folder: Path) -> bytes:
    """A .tar.gz of the model folder's files (serving.yaml at the root), skipping caches."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            if "__pycache__" in relative.parts or path.is_dir():
                continue
            archive.add(path, arcname=str(relative), recursive=False)
    return buffer.getvalue()


class ManagerClient:
    """Typed calls to /api/v1; every error becomes ApiError with the server's message."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 60.0) -> None:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/") + "/api/v1", headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ManagerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        if response.is_error:
            try:
                message = str(response.json().get("error", response.text))
            except ValueError:
                message = response.text
            raise ApiError(response.status_code, message)
        return response.json() if response.content else None

    def push_model(self, name: str, folder: Path) -> dict[str, Any]:
        """Upload a model folder as a new version of ``name``; returns the registered version."""
        archive = pack_model_folder(folder)
        files = {"archive": (f"{name}.tar.gz", archive, "application/gzip")}
        result: dict[str, Any] = self._call("POST", f"/models/{name}/versions", files=files)
        return result

    def get_model(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/models/{name}")
        return result

    def deploy(self, model: str, version: int, replicas: int, policies: dict[str, Any] | None = None) -> dict[str, Any]:
        """Create or scale a deployment; ``policies`` (docs/traffic_policies.md) replace the current ones if given."""
        body: dict[str, Any] = {"replicas": replicas}
        if policies is not None:
            body["policies"] = policies
        result: dict[str, Any] = self._call("PUT", f"/deployments/{model}/{version}", json=body)
        return result

    def get_deployment(self, model: str, version: int) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/deployments/{model}/{version}")
        return result

    def delete_deployment(self, model: str, version: int) -> None:
        self._call("DELETE", f"/deployments/{model}/{version}")

    def put_application(self, name: str, variants: list[tuple[str, int, int]]) -> dict[str, Any]:
        """Create or update a one-stage application from (model, version, weight) variants."""
        body = {"stages": [{"variants": [{"model": m, "version": v, "weight": w} for m, v, w in variants]}]}
        result: dict[str, Any] = self._call("PUT", f"/applications/{name}", json=body)
        return result

    def delete_application(self, name: str) -> None:
        self._call("DELETE", f"/applications/{name}")

    def list_proxies(self) -> list[dict[str, Any]]:
        """Envoys connected to xds_control, with what they acknowledged and their last rejection."""
        result: list[dict[str, Any]] = self._call("GET", "/proxies")
        return result
