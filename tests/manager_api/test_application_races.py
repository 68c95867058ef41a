"""An application written while a model version it names is being deleted: the answer is the 400 of a version that
is not registered, the same as when the delete came first, not a 503 inviting the same write again.

In process (the app served by uvicorn in a thread, requests over HTTP) so that the delete lands exactly between
the application's check and its etcd transaction: the check is made to see the version as it was just before.
"""

from __future__ import annotations

from pathlib import Path

from manager_under_test import python_model_archive, served

from manager_api.app import create_app
from manager_api.etcd_server import EtcdServer
from manager_api.settings import Settings
from manager_api.store.topology_store import TopologyStore
from protos.topology.models import ModelVersion


def test_a_version_deleted_between_check_and_write_is_a_400(
    etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path
) -> None:
    host, port = etcd_server.endpoint.rsplit(":", 1)
    settings = Settings(etcd_host=host, etcd_port=int(port), prefix=etcd_prefix, data_dir=tmp_path / "mgr")
    app = create_app(settings)
    with served(app) as http:
        upload = {"archive": ("m.tar.gz", python_model_archive())}
        assert http.post("/api/v1/models/m/versions", files=upload).status_code == 201
        store: TopologyStore = app.state.store  # type: ignore[attr-defined]
        view = http.get("/api/v1/models/m/versions/1").json()
        seen_by_check = ModelVersion.model_validate({k: v for k, v in view.items() if k != "revision"})
        assert http.delete("/api/v1/models/m/versions/1").status_code == 204

        async def as_before_the_delete(name: str, version: int) -> ModelVersion | None:
            return seen_by_check if (name, version) == ("m", 1) else None

        store.get_model_version = as_before_the_delete  # type: ignore[method-assign]
        body = {"stages": [{"variants": [{"model": "m", "version": 1, "weight": 100}]}]}
        response = http.put("/api/v1/applications/late", json=body)
        assert response.status_code == 400, response.text
        assert response.json() == {"error": "stages[0]: model version m:1 is not registered"}
        assert http.get("/api/v1/applications/late").status_code == 404
