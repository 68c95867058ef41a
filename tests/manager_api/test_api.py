"""The manager's REST API against a real etcd and a real `python -m manager_api` process (no deployer).

Every bad input gets a 4xx with a JSON error naming what is wrong, and leaves etcd and the artifact store as
they were.
"""

from __future__ import annotations

import asyncio
import io
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import aetcd
import httpx
import pytest
from pydantic import BaseModel

from manager_api.client import ManagerClient, pack_model_folder
from manager_api.etcd_server import EtcdServer
from manager_api.ports import free_port
from manager_api.processes import ChildProcess, http_ok
from manager_api.schemas import ModelVersionView
from protos.topology.instances import Instance, PipelineInstance
from protos.topology.keys import Keys
from protos.topology.proxies import ProxyStatus
from protos.topology.replicas import PipelineReplicaStatus

SERVING_YAML = """\
runtime: python
files: [model.py]
entrypoint: model:predict
signature:
  inputs: [{name: x, datatype: FP32, shape: [-1]}]
  outputs: [{name: y, datatype: FP32, shape: [-1]}]
"""
MODEL_PY = "def predict(inputs):\n    return {'y': inputs['x'] * 2}\n"


class Manager:
    def __init__(self, url: str, prefix: str, etcd: EtcdServer, data_dir: Path) -> None:
        self.http = httpx.Client(base_url=url + "/api/v1", timeout=30)
        self.url = url
        self.prefix = prefix
        self.etcd = etcd
        self.data_dir = data_dir

    def upload(self, name: str, archive: bytes, filename: str = "model.tar.gz") -> httpx.Response:
        return self.http.post(f"/models/{name}/versions", files={"archive": (filename, archive)})

    def etcd_keys(self) -> list[str]:
        async def read() -> list[str]:
            host, port = self.etcd.endpoint.rsplit(":", 1)
            async with aetcd.Client(host=host, port=int(port)) as client:
                return [kv.key.decode() for kv in await client.get_prefix(self.prefix.encode())]

        return asyncio.run(read())

    def put_record(self, key: str, record: BaseModel) -> None:
        """Write a record to etcd as another process would (xds_control, a deployer)."""

        async def write() -> None:
            host, port = self.etcd.endpoint.rsplit(":", 1)
            async with aetcd.Client(host=host, port=int(port)) as client:
                await client.put(key.encode(), record.model_dump_json().encode())

        asyncio.run(write())

    def stored_blobs(self) -> list[Path]:
        return sorted((self.data_dir / "artifacts" / "blobs" / "sha256").iterdir())


@pytest.fixture(scope="module")
def manager(etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Manager]:
    data_dir = tmp_path_factory.mktemp("manager")
    port = free_port()
    prefix = "/hydro-manager-test/"
    process = ChildProcess(
        "manager_api",
        [
            sys.executable,
            "-m",
            "manager_api",
            "--etcd",
            etcd_server.endpoint,
            "--prefix",
            prefix,
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
        ],
        log_path=data_dir / "manager.log",
    ).start()
    try:
        url = f"http://127.0.0.1:{port}"
        process.wait_ready(lambda: http_ok(f"{url}/healthz"), 60)
        manager = Manager(url, prefix, etcd_server, data_dir)
        yield manager
        manager.http.close()
    finally:
        process.stop()


def folder_archive(tmp_path: Path, serving: str = SERVING_YAML, files: dict[str, str] | None = None) -> bytes:
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "serving.yaml").write_text(serving)
    for name, text in (files if files is not None else {"model.py": MODEL_PY}).items():
        (folder / name).write_text(text)
    return pack_model_folder(folder)


def tar_with(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def assert_error(response: httpx.Response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    message = response.json()["error"]
    for fragment in fragments:
        assert fragment in message, message


def test_register_versions_are_numbered_and_stored(manager: Manager, tmp_path: Path) -> None:
    archive = folder_archive(tmp_path)
    first = manager.upload("doubler", archive)
    assert first.status_code == 201, first.text
    assert first.json()["version"] == 1 and first.json()["runtime"] == "python"
    assert first.json()["signature"]["inputs"][0]["name"] == "x"
    assert manager.upload("doubler", archive).json()["version"] == 2

    model = manager.http.get("/models/doubler").json()
    assert [v["version"] for v in model["versions"]] == [1, 2]
    assert manager.http.get("/models/doubler/versions/2").json()["artifact"] == first.json()["artifact"]
    assert "doubler" in [m["name"] for m in manager.http.get("/models").json()]

    keys = Keys(manager.prefix)
    stored = manager.etcd_keys()
    assert keys.model_version("doubler", 1) in stored and keys.model_version("doubler", 2) in stored
    # The same bytes are stored once, and the unpacked folder is what runtimes will load.
    digest = ModelVersionView.model_validate(first.json()).artifact.digest.split(":")[1]
    assert (manager.data_dir / "artifacts" / "blobs" / "sha256" / digest).is_file()
    assert (manager.data_dir / "artifacts" / "folders" / "sha256" / digest / "model.py").is_file()


def test_concurrent_uploads_get_distinct_versions(manager: Manager, tmp_path: Path) -> None:
    archive = folder_archive(tmp_path)

    async def upload_many() -> list[int]:
        async with httpx.AsyncClient(base_url=manager.url + "/api/v1", timeout=30) as client:
            responses = await asyncio.gather(
                *(client.post("/models/racer/versions", files={"archive": ("m.tar.gz", archive)}) for _ in range(6))
            )
        return sorted(r.json()["version"] for r in responses)

    assert asyncio.run(upload_many()) == [1, 2, 3, 4, 5, 6]


def test_zip_archive_with_a_top_folder_is_accepted(manager: Manager) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        bundle.writestr("doubler/serving.yaml", SERVING_YAML)
        bundle.writestr("doubler/model.py", MODEL_PY)
    response = manager.upload("zipped", buffer.getvalue(), "model.zip")
    assert response.status_code == 201, response.text
    # The top folder is stripped: the registered model holds the files as a folder upload would.
    assert sorted(response.json()["artifact"]["files"]) == ["model.py", "serving.yaml"], response.text
    assert response.json()["runtime"] == "python" and response.json()["version"] == 1, response.text


@pytest.mark.parametrize(
    ("archive", "fragments"),
    [
        (tar_with({"serving.yaml": b"runtime: [unclosed"}), ["not valid YAML"]),
        (tar_with({"serving.yaml": b"runtime: python\nfiles: []\n"}), ["signature", "Field required"]),
        (
            tar_with({"serving.yaml": SERVING_YAML.replace("python", "caffe").encode()}),
            ["runtime", "caffe"],
        ),
        (tar_with({"serving.yaml": SERVING_YAML.encode()}), ["missing", "model.py"]),
        (
            tar_with(
                {
                    "serving.yaml": SERVING_YAML.replace(
                        "FP32, shape: [-1]}]\n  outputs", "FP99, shape: [-1]}]\n  outputs"
                    ).encode(),
                    "model.py": b"",
                }
            ),
            ["signature.inputs.0.datatype"],
        ),
        (tar_with({"model.py": MODEL_PY.encode()}), ["no serving.yaml"]),
        (tar_with({"../escape.py": b"x", "serving.yaml": SERVING_YAML.encode()}), ["outside the model folder"]),
        (b"this is not an archive", ["not a .tar"]),
        (b"", ["empty"]),
    ],
    ids=[
        "malformed-yaml",
        "missing-signature",
        "unknown-runtime",
        "named-file-missing",
        "unknown-datatype",
        "no-serving-yaml",
        "path-traversal",
        "not-an-archive",
        "empty",
    ],
)
def test_bad_uploads_are_refused_and_change_nothing(manager: Manager, archive: bytes, fragments: list[str]) -> None:
    before_keys = manager.etcd_keys()
    before_blobs = manager.stored_blobs()
    assert_error(manager.upload("refused", archive), 400, *fragments)
    assert manager.etcd_keys() == before_keys
    assert manager.stored_blobs() == before_blobs
    assert not list((manager.data_dir / "artifacts" / "staging").iterdir()), "staging is cleaned up"
    assert not (manager.data_dir.parent / "escape.py").exists()
    assert_error(manager.http.get("/models/refused"), 404, "refused")


def test_upload_without_archive_field_and_bad_name(manager: Manager, tmp_path: Path) -> None:
    assert_error(manager.http.post("/models/doubler/versions", data={"x": "1"}), 422, "archive")
    assert_error(manager.upload("Bad Name!", folder_archive(tmp_path)), 400, "invalid model name")


def test_deployments(manager: Manager, tmp_path: Path) -> None:
    assert manager.upload("deployed", folder_archive(tmp_path)).status_code == 201
    created = manager.http.put("/deployments/deployed/1", json={"replicas": 2})
    assert created.status_code == 200, created.text
    assert created.json()["replicas"] == 2 and created.json()["instances"] == []
    scaled = manager.http.put("/deployments/deployed/1", json={"replicas": 3}).json()
    assert scaled["replicas"] == 3 and scaled["created_at"] == created.json()["created_at"]
    assert Keys(manager.prefix).deployment("deployed", 1) in manager.etcd_keys()
    listed = manager.http.get("/deployments").json()
    assert [(d["model"], d["version"], d["replicas"]) for d in listed if d["model"] == "deployed"] == [
        ("deployed", 1, 3)
    ]
    assert manager.http.delete("/deployments/deployed/1").status_code == 204
    assert Keys(manager.prefix).deployment("deployed", 1) not in manager.etcd_keys()
    assert_error(manager.http.get("/deployments/deployed/1"), 404, "deployed:1")
    assert_error(manager.http.delete("/deployments/deployed/1"), 404, "deployed:1")


def test_bad_deployments_are_refused(manager: Manager, tmp_path: Path) -> None:
    assert manager.upload("scaled", folder_archive(tmp_path)).status_code == 201
    before = manager.etcd_keys()
    assert_error(manager.http.put("/deployments/nope/1", json={"replicas": 1}), 404, "nope:1")
    assert_error(manager.http.put("/deployments/scaled/9", json={"replicas": 1}), 404, "scaled:9")
    assert_error(manager.http.put("/deployments/scaled/1", json={"replicas": -1}), 422, "replicas")
    assert_error(manager.http.put("/deployments/scaled/1", json={"replica": 1}), 422, "replicas")
    assert_error(manager.http.put("/deployments/scaled/one", json={"replicas": 1}), 422, "version")
    not_json = manager.http.put(
        "/deployments/scaled/1", content=b"{replicas: 1", headers={"content-type": "application/json"}
    )
    assert_error(not_json, 400, "not valid JSON")
    assert manager.etcd_keys() == before


def test_applications(manager: Manager, tmp_path: Path) -> None:
    archive = folder_archive(tmp_path)
    for _ in range(2):
        assert manager.upload("split", archive).status_code == 201
    ManagerClient(manager.url).put_application("shop", [("split", 1, 100)])
    client = ManagerClient(manager.url)
    updated = client.put_application("shop", [("split", 1, 30), ("split", 2, 70)])
    assert [v["weight"] for v in updated["stages"][0]["variants"]] == [30, 70]
    stored = manager.http.get("/applications/shop").json()
    assert stored["stages"] == updated["stages"]
    # Nothing runs yet (this manager has no deployer): the status says which variant would fail its share.
    assert stored["status"]["ready"] is False
    assert stored["status"]["reason"] == "stage 1: no ready replica of split:1 (weight 30), split:2 (weight 70)"
    manager.put_record(
        Keys(manager.prefix).instance("split", 1, "r1"),
        Instance(model="split", version=1, id="r1", node="n", address="127.0.0.1", port=1),
    )
    half = manager.http.get("/applications/shop").json()["status"]
    assert half["reason"] == "stage 1: no ready replica of split:2 (weight 70)"
    assert [(v["version"], v["weight"], v["ready_replicas"]) for v in half["variants"]] == [(1, 30, 1), (2, 70, 0)]
    client.put_application("shop", [("split", 1, 100), ("split", 2, 0)])
    assert manager.http.get("/applications").json()[0]["status"] == {
        "ready": True,
        "reason": None,
        "variants": [
            {"stage": 1, "model": "split", "version": 1, "weight": 100, "ready_replicas": 1},
            {"stage": 1, "model": "split", "version": 2, "weight": 0, "ready_replicas": 0},
        ],
        "pipeline_ready_replicas": None,
        "pipeline_replicas": None,
    }
    # A shadow makes it a pipeline: not ready until a pipeline runtime is registered.
    shadowed = [
        {"variants": [{"model": "split", "version": 1, "weight": 100}], "shadows": [{"model": "split", "version": 2}]}
    ]
    assert_error(
        manager.http.put("/applications/shop", json={"stages": shadowed, "pipeline_replicas": 0}),
        422,
        "pipeline_replicas",
    )
    twice = [{**shadowed[0], "shadows": [{"model": "split", "version": 1}]}]
    assert_error(manager.http.put("/applications/shop", json={"stages": twice}), 400, "split:1 is listed twice")
    piped = client.put_application_stages("shop", shadowed)
    assert piped["pipeline_replicas"] == 1
    assert piped["status"]["reason"] == "pipeline: no ready replica of its pipeline runtime"
    assert piped["status"]["pipeline_ready_replicas"] == 0
    assert piped["status"]["pipeline_replicas"] == []
    # A crash-looping pipeline runtime: the reason quotes its last error, the replica shows in the status.
    crashed = PipelineReplicaStatus(
        app="shop", id="p0", node="n", state="crash-looping", address="127.0.0.1", spec_digest="sha256:x",
        restarts=2, last_error="pipeline-shop-p0 exited with code 1\n--- log ---\nstage 1 has no signature",
    )  # fmt: skip
    manager.put_record(Keys(manager.prefix).pipeline_status("shop", "p0"), crashed)
    looping = manager.http.get("/applications/shop").json()["status"]
    assert looping["reason"] == (
        "pipeline: no ready replica of its pipeline runtime (replica p0 crash-looping: pipeline-shop-p0 exited with "
        "code 1)"
    )
    assert [(r["id"], r["state"], r["restarts"]) for r in looping["pipeline_replicas"]] == [("p0", "crash-looping", 2)]
    assert "stage 1 has no signature" in looping["pipeline_replicas"][0]["last_error"]
    # A shadow is a user of its model version like a variant.
    assert_error(manager.http.delete("/models/split/versions/2"), 409, "in use by application shop")
    pipeline = PipelineInstance(app="shop", id="p1", node="n", address="127.0.0.1", port=2, spec_digest="sha256:x")
    manager.put_record(Keys(manager.prefix).pipeline("shop", "p1"), pipeline)
    status = manager.http.get("/applications/shop").json()["status"]
    assert (status["ready"], status["pipeline_ready_replicas"]) == (True, 1)
    assert "shop" in [a["name"] for a in manager.http.get("/applications").json()]
    assert manager.http.delete("/applications/shop").status_code == 204
    assert_error(manager.http.get("/applications/shop"), 404, "shop")
    client.close()


def test_bad_applications_are_refused(manager: Manager, tmp_path: Path) -> None:
    assert manager.upload("weighted", folder_archive(tmp_path)).status_code == 201
    other = SERVING_YAML.replace("{name: x, datatype: FP32", "{name: x, datatype: FP64")
    assert manager.upload("weighted", folder_archive(tmp_path, serving=other)).status_code == 201

    def variants(*items: tuple[str, int, int]) -> dict[str, object]:
        return {"stages": [{"variants": [{"model": m, "version": v, "weight": w} for m, v, w in items]}]}

    before = manager.etcd_keys()
    put = manager.http.put
    assert_error(put("/applications/app", json=variants(("weighted", 1, 60))), 400, "sum to 100", "60")
    assert_error(put("/applications/app", json=variants(("weighted", 1, 60), ("weighted", 1, 40))), 400, "twice")
    assert_error(put("/applications/app", json=variants(("ghost", 1, 100))), 400, "ghost:1", "not registered")
    assert_error(put("/applications/app", json=variants(("weighted", 5, 100))), 400, "weighted:5")
    assert_error(put("/applications/app", json=variants(("weighted", 1, 101))), 422, "weight")
    assert_error(put("/applications/app", json={"stages": []}), 422, "stages")
    two = {"stages": [variants(("weighted", 1, 100))["stages"][0]] * 2}  # type: ignore[index]
    assert_error(put("/applications/app", json={"stages": two["stages"] * 9}), 400, "at most 16 stages")
    # An A/B split between versions that do not take the same inputs: traffic could not move between them.
    split = variants(("weighted", 1, 50), ("weighted", 2, 50))
    assert_error(
        put("/applications/app", json=split),
        400,
        "stage 1: weighted:2 takes x (FP64 [-1]) but weighted:1 takes x (FP32 [-1])",
    )
    assert_error(put("/applications/UPPER", json=variants(("weighted", 1, 100))), 400, "invalid application name")
    assert_error(put("/applications/app", content=b"nope", headers={"content-type": "application/json"}), 400, "JSON")
    assert manager.etcd_keys() == before


def test_unknown_endpoints_answer_json(manager: Manager) -> None:
    assert_error(manager.http.get("/nothing-here"), 404, "/api/v1/nothing-here")
    assert_error(manager.http.post("/deployments"), 405, "POST")


def test_proxies_show_what_xds_control_recorded(manager: Manager) -> None:
    status = ProxyStatus(node_id="ingress", role="ingress", acked={"Cluster": "abc"}, last_nack="Cluster v2: bad")
    manager.put_record(Keys(manager.prefix).proxy("ingress"), status)
    listed = manager.http.get("/proxies").json()
    assert [p["node_id"] for p in listed] == ["ingress"]
    one = manager.http.get("/proxies/ingress").json()
    assert one["last_nack"] == "Cluster v2: bad" and one["acked"] == {"Cluster": "abc"}
    assert_error(manager.http.get("/proxies/nobody"), 404, "nobody")


def test_delete_model_version_refused_while_in_use(manager: Manager, tmp_path: Path) -> None:
    archive = folder_archive(tmp_path)
    for _ in range(3):
        assert manager.upload("deletable", archive).status_code == 201
    keys = Keys(manager.prefix)
    assert manager.http.put("/deployments/deletable/1", json={"replicas": 1}).status_code == 200
    body = {"stages": [{"variants": [{"model": "deletable", "version": 2, "weight": 100}]}]}
    assert manager.http.put("/applications/uses-two", json=body).status_code == 200

    assert_error(manager.http.delete("/models/deletable/versions/1"), 409, "deployment deletable:1")
    assert_error(manager.http.delete("/models/deletable/versions/2"), 409, "application uses-two")
    assert keys.model_version("deletable", 1) in manager.etcd_keys()
    assert keys.model_version("deletable", 2) in manager.etcd_keys()

    assert manager.http.delete("/models/deletable/versions/3").status_code == 204
    assert keys.model_version("deletable", 3) not in manager.etcd_keys()
    assert_error(manager.http.delete("/models/deletable/versions/3"), 404, "deletable:3")
    # A deleted version cannot be routed to, and its number is not handed out again.
    body = {"stages": [{"variants": [{"model": "deletable", "version": 3, "weight": 100}]}]}
    assert_error(manager.http.put("/applications/uses-three", json=body), 400, "deletable:3")
    assert manager.upload("deletable", archive).json()["version"] == 4

    assert manager.http.delete("/deployments/deletable/1").status_code == 204
    assert manager.http.delete("/models/deletable/versions/1").status_code == 204
