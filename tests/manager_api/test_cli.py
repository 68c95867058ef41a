"""The `hydro` command line against a real manager (`python -m manager_api` with bearer tokens) on a real etcd.

Most commands run in-process through typer's CliRunner; the connection tests run the installed `hydro` executable.
The CLI finds the manager and its admin token the way a user's does: in the credentials file of ``--data-dir``.
`hydro predict` talks to a real runtime (`python -m runtimes`) standing in for the ingress: both speak OIP REST.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aetcd
import pytest
import yaml
from click.testing import Result
from typer.testing import CliRunner

from manager_api.auth import write_token_file
from manager_api.cli import app
from manager_api.client import ManagerClient, pack_model_to_file
from manager_api.credentials import ensure_admin_credentials
from manager_api.etcd_server import EtcdServer
from manager_api.ports import free_port
from manager_api.processes import ChildProcess, http_ok
from protos.topology.keys import Keys
from protos.topology.proxies import ProxyStatus
from protos.topology.replicas import PipelineReplicaStatus

VIEWER = "viewer-token-for-cli-tests"
SERVING_YAML = """\
runtime: python
files: [model.py]
entrypoint: model:predict
signature:
  inputs: [{name: x, datatype: FP32, shape: [-1]}]
  outputs: [{name: y, datatype: FP32, shape: [-1]}]
"""
DOUBLE = "def predict(inputs):\n    return {'y': inputs['x'] * 2}\n"
TRIPLE = "def predict(inputs):\n    return {'y': inputs['x'] * 3}\n"
HYDRO = Path(sys.executable).parent / "hydro"


@dataclass
class Manager:
    url: str
    prefix: str
    etcd: EtcdServer
    #: Holds credentials.json (the admin token and URL), as `hydro up` leaves it.
    cli_dir: Path
    admin_token: str

    def etcd_records(self) -> dict[str, dict[str, object]]:
        """Every record under the manager's prefix, by key relative to it (version counters left out)."""

        async def read() -> dict[str, dict[str, object]]:
            host, port = self.etcd.endpoint.rsplit(":", 1)
            async with aetcd.Client(host=host, port=int(port)) as client:
                found = await client.get_prefix(self.prefix.encode())
            return {
                kv.key.decode()[len(self.prefix) :]: json.loads(kv.value)
                for kv in found
                if not kv.key.decode()[len(self.prefix) :].startswith("version-counters/")
            }

        return asyncio.run(read())

    def client(self) -> ManagerClient:
        return ManagerClient(self.url, self.admin_token)


@pytest.fixture(scope="module")
def manager(etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Manager]:
    data_dir = tmp_path_factory.mktemp("manager-cli")
    cli_dir = tmp_path_factory.mktemp("cli-data")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    credentials, tokens = ensure_admin_credentials(cli_dir, url)
    write_token_file(tokens, {"admin": ("admin", credentials.token), "viewer": ("viewer", VIEWER)})
    prefix = "/hydro-cli-test/"
    process = ChildProcess(
        "manager_api",
        [
            *(sys.executable, "-m", "manager_api", "--etcd", etcd_server.endpoint, "--prefix", prefix),
            *("--data-dir", str(data_dir), "--port", str(port), "--tokens", str(tokens)),
        ],
        log_path=data_dir / "manager.log",
    ).start()
    try:
        process.wait_ready(lambda: http_ok(f"{url}/healthz"), 60)
        yield Manager(url, prefix, etcd_server, cli_dir, credentials.token)
    finally:
        process.stop()


def hydro(manager: Manager, *args: str, env: dict[str, str | None] | None = None) -> Result:
    """Run `hydro ARGS --data-dir <the credentials dir>` in-process, with no HYDRO_* variables unless given."""
    environment: dict[str, str | None] = {"HYDRO_API_URL": None, "HYDRO_TOKEN": None, "COLUMNS": "200"}
    environment.update(env or {})
    return CliRunner().invoke(app, [*args, "--data-dir", str(manager.cli_dir)], env=environment)


def ok(result: Result) -> str:
    assert result.exit_code == 0, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result.stdout


def failed(result: Result) -> str:
    """The single error line of a failed command."""
    assert result.exit_code == 1, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), result.stderr
    return result.stderr


def model_folder(root: Path, name: str = "model", code: str = DOUBLE) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "serving.yaml").write_text(SERVING_YAML)
    (folder / "model.py").write_text(code)
    return folder


def doc(kind: str, name: str, spec: dict[str, object]) -> dict[str, object]:
    return {"apiVersion": "hydro.serving/v1", "kind": kind, "metadata": {"name": name}, "spec": spec}


def write_manifests(path: Path, *docs: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def test_apply_creates_configures_and_leaves_unchanged(manager: Manager, tmp_path: Path) -> None:
    folder = model_folder(tmp_path)
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    # One object per file, named so that sorted order is the reverse of dependency order: apply must reorder.
    write_manifests(manifests / "a-app.yaml", doc("Application", "cli-app", {"stages": [
        {"variants": [{"model": "cli-apply", "version": "latest", "weight": 100}]}]}))  # fmt: skip
    write_manifests(manifests / "b-deploy.yml", doc("Deployment", "cli-apply", {"version": "latest", "replicas": 1}))
    # A Model's path is relative to its manifest file.
    write_manifests(manifests / "c-model.yaml", doc("Model", "cli-apply", {"path": "../model"}))
    (manifests / "notes.txt").write_text("not a manifest")

    first = ok(hydro(manager, "apply", "-f", str(manifests)))
    assert first.splitlines() == [
        "model/cli-apply created (version 1)",
        "deployment/cli-apply created (cli-apply:1, 1 replica)",
        "application/cli-app created (cli-apply:1 100%)",
    ]
    records = manager.etcd_records()
    assert records["deployments/cli-apply/1"]["replicas"] == 1
    assert records["applications/cli-app"]["stages"] == [
        {"variants": [{"model": "cli-apply", "version": 1, "weight": 100}], "shadows": []}
    ]

    # Archives are reproducible: touching the files does not make a new version.
    for path in folder.iterdir():
        os.utime(path, (1_000_000_000, 1_000_000_000))
    again = json.loads(ok(hydro(manager, "apply", "-f", str(manifests), "-o", "json")))
    assert [(o["kind"], o["action"]) for o in again] == [
        ("Model", "unchanged"),
        ("Deployment", "unchanged"),
        ("Application", "unchanged"),
    ]
    assert manager.etcd_records() == records

    # Scale and set a policy: only the deployment changes.
    write_manifests(
        manifests / "b-deploy.yml",
        doc("Deployment", "cli-apply", {"model": "cli-apply", "replicas": 2, "policies": {"timeout_ms": 5000}}),
    )
    third = ok(hydro(manager, "apply", "-f", str(manifests)))
    assert "model/cli-apply unchanged" in third and "application/cli-app unchanged" in third
    assert "deployment/cli-apply configured (cli-apply:1, 2 replicas)" in third
    deployment = manager.etcd_records()["deployments/cli-apply/1"]
    assert deployment["replicas"] == 2 and deployment["policies"]["timeout_ms"] == 5000  # type: ignore[index]

    # A changed model file is a new version; "latest" follows it in the same run.
    (folder / "model.py").write_text(TRIPLE)
    fourth = ok(hydro(manager, "apply", "-f", str(manifests)))
    assert fourth.splitlines() == [
        "model/cli-apply configured (version 2)",
        "deployment/cli-apply created (cli-apply:2, 2 replicas)",
        "application/cli-app configured (cli-apply:2 100%)",
    ]
    records = manager.etcd_records()
    assert "models/cli-apply/2" in records and "deployments/cli-apply/2" in records
    assert records["applications/cli-app"]["stages"][0]["variants"][0]["version"] == 2  # type: ignore[index]


def test_apply_sets_shadows_and_pipeline_replicas(manager: Manager, tmp_path: Path) -> None:
    model_folder(tmp_path)
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    write_manifests(
        manifests / "models.yaml",
        doc("Model", "cli-shadowed", {"path": "../model"}),
        doc("Model", "cli-shadow", {"path": "../model"}),
    )
    stage = {
        "variants": [{"model": "cli-shadowed", "version": "latest", "weight": 100}],
        "shadows": [{"model": "cli-shadow", "version": "latest"}],
    }
    app = doc("Application", "cli-shadow-app", {"stages": [stage], "pipeline_replicas": 2})
    write_manifests(manifests / "z-app.yaml", app)
    assert "application/cli-shadow-app created" in ok(hydro(manager, "apply", "-f", str(manifests)))
    record = manager.etcd_records()["applications/cli-shadow-app"]
    assert record["pipeline_replicas"] == 2
    assert record["stages"] == [
        {
            "variants": [{"model": "cli-shadowed", "version": 1, "weight": 100}],
            "shadows": [{"model": "cli-shadow", "version": 1}],
        }
    ]
    # Shadows and the pipeline count are part of what "unchanged" compares.
    assert "application/cli-shadow-app unchanged" in ok(hydro(manager, "apply", "-f", str(manifests)))
    write_manifests(manifests / "z-app.yaml", doc("Application", "cli-shadow-app", {"stages": [stage]}))
    assert "application/cli-shadow-app configured" in ok(hydro(manager, "apply", "-f", str(manifests)))
    assert manager.etcd_records()["applications/cli-shadow-app"]["pipeline_replicas"] == 1


BAD_CASES = {
    "unknown kind": (
        "apiVersion: hydro.serving/v1\nkind: Gadget\nmetadata: {name: g}\nspec: {}\n",
        "document 2: kind: unknown kind 'Gadget'",
    ),
    "missing field": (
        "apiVersion: hydro.serving/v1\nkind: Deployment\nmetadata: {name: cli-bad}\nspec: {version: 1}\n",
        "document 2: spec.replicas: Field required",
    ),
    "bad value": (
        "apiVersion: hydro.serving/v1\nkind: Deployment\nmetadata: {name: cli-bad}\nspec: {replicas: 1, version: 0}\n",
        "document 2: spec.version: must be a version number (1, 2, ...) or 'latest', got 0",
    ),
    "bad weights": (
        "apiVersion: hydro.serving/v1\nkind: Application\nmetadata: {name: cli-bad}\n"
        "spec: {stages: [{variants: [{model: cli-bad, version: latest, weight: 90}]}]}\n",
        "document 2: spec.stages.0.variants: weights must sum to 100, got 90 = 90",
    ),
    "bad YAML": (
        "apiVersion: hydro.serving/v1\nkind: [Deployment\n",
        # The line is the file's: the Model document before it takes seven.
        "document 2: not valid YAML at line 10, column 1: expected ',' or ']'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_manifests_name_file_document_and_field_and_write_nothing(
    manager: Manager, tmp_path: Path, case: str
) -> None:
    folder = model_folder(tmp_path)
    text, expected = BAD_CASES[case]
    # A good Model document comes first: it must not be pushed, since the file as a whole is refused.
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc("Model", "cli-bad", {"path": str(folder)})) + "---\n" + text)
    before = manager.etcd_records()
    message = failed(hydro(manager, "apply", "-f", str(path)))
    assert f"{path}: {expected}" in message
    assert manager.etcd_records() == before


def test_manifests_refer_to_registered_versions_before_anything_is_written(manager: Manager, tmp_path: Path) -> None:
    folder = model_folder(tmp_path)
    path = write_manifests(
        tmp_path / "refs.yaml",
        doc("Model", "cli-refs", {"path": str(folder)}),
        doc("Deployment", "cli-refs", {"version": 7, "replicas": 1}),
        doc("Application", "cli-refs", {"stages": [{"variants": [{"model": "nowhere", "version": 1, "weight": 100}]}]}),
    )
    before = manager.etcd_records()
    message = failed(hydro(manager, "apply", "-f", str(path)))
    assert f"{path}: document 2: spec: cli-refs:7 is not registered" in message
    assert f"{path}: document 3: spec.stages.0.variants.0: nowhere:1 is not registered (and no Model" in message
    assert manager.etcd_records() == before
    missing = tmp_path / "missing.yaml"
    assert f"error: {missing}: no such file or directory" in failed(hydro(manager, "apply", "-f", str(missing)))
    # A model path that is not a model folder is named too.
    bad_path = write_manifests(tmp_path / "path.yaml", doc("Model", "cli-refs", {"path": "missing"}))
    assert f"{bad_path}: document 1: spec.path: {tmp_path / 'missing'} is not a model folder" in failed(
        hydro(manager, "apply", "-f", str(bad_path))
    )


def test_push_get_describe_delete(manager: Manager, tmp_path: Path) -> None:
    folder = model_folder(tmp_path, "cli-push")
    assert "model/cli-push version 1 pushed (python" in ok(hydro(manager, "model", "push", str(folder)))
    pushed = json.loads(ok(hydro(manager, "model", "push", str(folder), "--name", "cli-push", "-o", "json")))
    assert pushed["version"] == 2 and pushed["artifact"]["digest"].startswith("sha256:")
    assert manager.etcd_records()["models/cli-push/2"]["artifact"] == pushed["artifact"]

    # -o json and -o yaml are the same data, and it is the API's.
    as_json = json.loads(ok(hydro(manager, "get", "models", "cli-push", "-o", "json")))
    as_yaml = yaml.safe_load(ok(hydro(manager, "get", "model", "cli-push", "-o", "yaml")))
    assert as_json == as_yaml
    assert [v["version"] for v in as_json[0]["versions"]] == [1, 2]
    with manager.client() as client:
        assert as_json == [client.get_model("cli-push")]
        client.deploy("cli-push", 1, 3)
        client.put_application("cli-push-app", [("cli-push", 1, 100)])
    table = ok(hydro(manager, "get", "models"))
    assert "MODEL" in table and "cli-push" in table and pushed["artifact"]["digest"][:19] in table

    deployments = json.loads(ok(hydro(manager, "get", "deployments", "cli-push", "-o", "json")))
    assert [(d["model"], d["version"], d["replicas"], d["ready_replicas"]) for d in deployments] == [
        ("cli-push", 1, 3, 0)
    ]
    assert "0/3" in ok(hydro(manager, "get", "deploy"))
    described = yaml.safe_load(ok(hydro(manager, "describe", "deployment", "cli-push", "-o", "yaml")))
    assert described["version"] == 1 and described["policies"]["timeout_ms"] == 60000
    text = ok(hydro(manager, "describe", "model", "cli-push"))
    assert "Signature (version 2)" in text and "FP32" in text
    app_text = ok(hydro(manager, "describe", "app", "cli-push-app"))
    # Stages are counted from 1, as in the application's status and the x-hydro-stages header.
    assert ["1", "cli-push", "1", "100%"] in [line.split() for line in app_text.splitlines()]

    # The API's refusal is one red line with its own words.
    message = failed(hydro(manager, "delete", "model", "cli-push", "--version", "1"))
    assert "is in use by" in message and "cli-push-app" in message
    assert "models/cli-push/1" in manager.etcd_records()
    assert "application/cli-push-app deleted" in ok(hydro(manager, "delete", "application", "cli-push-app"))
    assert "deployment/cli-push:1 deleted" in ok(hydro(manager, "delete", "deployment", "cli-push:1"))
    deleted = ok(hydro(manager, "delete", "model", "cli-push"))
    assert deleted.splitlines() == ["model/cli-push:2 deleted", "model/cli-push:1 deleted"]
    assert not [key for key in manager.etcd_records() if "cli-push" in key]
    assert "not found" in failed(hydro(manager, "describe", "model", "cli-push"))
    # As `kubectl get KIND NAME`: a name that matches nothing is an error, not an empty list.
    assert "model 'cli-push' not found" in failed(hydro(manager, "get", "models", "cli-push", "-o", "json"))
    assert "unknown kind 'gadgets'" in failed(hydro(manager, "get", "gadgets"))


def test_upload_streams_from_a_file_and_reports_bytes_sent(manager: Manager, tmp_path: Path) -> None:
    folder = model_folder(tmp_path)
    # Incompressible, so the archive is several chunks long.
    (folder / "weights.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    packed_progress: list[int] = []
    packed = pack_model_to_file(folder, tmp_path / "model.tar.gz", packed_progress.append)
    assert packed_progress[-1] == sum(p.stat().st_size for p in folder.iterdir())
    sent: list[int] = []
    with manager.client() as client:
        record = client.upload_model("cli-stream", packed, sent.append)
    assert len(sent) > 1 and sent == sorted(sent) and sent[-1] == packed.size
    assert record["artifact"]["digest"] == packed.digest and record["artifact"]["size"] == packed.size
    assert manager.etcd_records()["models/cli-stream/1"]["artifact"] == record["artifact"]


def test_describe_application_shows_readiness_shadows_and_pipeline_replicas(manager: Manager, tmp_path: Path) -> None:
    with manager.client() as client:
        client.push_model("cli-pipe", model_folder(tmp_path))
        client.push_model("cli-pipe", model_folder(tmp_path))
        # One stage, with a shadow: the pipeline runtime makes the shadow calls.
        stages = [
            {
                "variants": [{"model": "cli-pipe", "version": 1, "weight": 100}],
                "shadows": [{"model": "cli-pipe", "version": 2}],
            }
        ]
        client.put_application_stages("cli-pipe-app", stages)
    # What a deployer reports of a pipeline runtime that keeps failing.
    crashed = PipelineReplicaStatus(
        app="cli-pipe-app", id="p0", node="n1", state="crash-looping", address="127.0.0.1", port=4100,
        spec_digest="sha256:x", restarts=3, last_error="pipeline-cli-pipe-app-p0 exited with code 1\nno signature",
    )  # fmt: skip

    async def write() -> None:
        host, port = manager.etcd.endpoint.rsplit(":", 1)
        async with aetcd.Client(host=host, port=int(port)) as client:
            key = Keys(manager.prefix).pipeline_status("cli-pipe-app", "p0")
            await client.put(key.encode(), crashed.model_dump_json().encode())

    asyncio.run(write())
    lines = ok(hydro(manager, "describe", "app", "cli-pipe-app")).splitlines()
    text = "\n".join(lines)
    assert "Ready: no: stage 1: no ready replica of cli-pipe:1" in " ".join(text.split()), text
    rows = [line.split() for line in lines]
    assert ["1", "cli-pipe", "1", "100%"] in rows and ["1", "cli-pipe", "2", "shadow"] in rows, text
    assert "Pipeline: 0 ready / 1 desired" in text
    assert ["p0", "n1", "127.0.0.1:4100", "crash-looping", "3"] in [row[:5] for row in rows], text
    assert "Last error of p0:" in text and "no signature" in text
    with manager.client() as client:
        client.delete_application("cli-pipe-app")


def test_status_and_proxies_show_acks_and_nacks(manager: Manager, tmp_path: Path) -> None:
    status = ProxyStatus(
        node_id="cli-ingress", role="ingress", acked={"Cluster": "v3", "Listener": "v3"}, last_nack="Listener v4: bad"
    )

    async def write() -> None:
        host, port = manager.etcd.endpoint.rsplit(":", 1)
        async with aetcd.Client(host=host, port=int(port)) as client:
            await client.put(Keys(manager.prefix).proxy("cli-ingress").encode(), status.model_dump_json().encode())

    asyncio.run(write())
    with manager.client() as client:
        client.push_model("cli-status", model_folder(tmp_path))
        client.deploy("cli-status", 1, 2)
        client.put_application("cli-status-app", [("cli-status", 1, 100)])
    summary = json.loads(ok(hydro(manager, "status", "-o", "json")))
    app = next(a for a in summary["applications"] if a["name"] == "cli-status-app")
    # No deployer runs here: the application cannot answer, and the status says why.
    assert (app["ready"], app["reason"]) == (False, "stage 1: no ready replica of cli-status:1 (weight 100)")
    assert summary["api"] == {"url": manager.url, "status": "ok", "etcd": "ok"}
    assert {"name": "cli-status", "versions": [1]} in summary["models"]
    assert {"model": "cli-status", "version": 1, "replicas": 2, "ready": 0} in summary["deployments"]
    proxy = next(p for p in summary["proxies"] if p["node_id"] == "cli-ingress")
    assert proxy == {"node_id": "cli-ingress", "role": "ingress", "acked": status.acked, "last_nack": status.last_nack}
    text = ok(hydro(manager, "status"))
    assert f"Manager API {manager.url}: ok (etcd ok)" in text
    assert "NACK: Listener v4: bad" in text and "0/2" in text
    assert "stage 1: no ready replica of cli-status:1" in text.replace("\n", "")
    proxies = json.loads(ok(hydro(manager, "get", "proxies", "cli-ingress", "-o", "json")))
    assert proxies[0]["acked"] == {"Cluster": "v3", "Listener": "v3"}
    assert "CDS LDS" in ok(hydro(manager, "get", "proxies"))
    assert "cannot be deleted" in failed(hydro(manager, "delete", "proxy", "cli-ingress"))


def test_auth_errors_are_one_line_with_the_api_error(manager: Manager, tmp_path: Path) -> None:
    message = failed(hydro(manager, "get", "models", "--token", "not-a-token"))
    assert message.strip() == "error: unknown bearer token (HTTP 401; token from --token or HYDRO_TOKEN)"
    path = write_manifests(tmp_path / "m.yaml", doc("Model", "cli-auth", {"path": str(model_folder(tmp_path))}))
    # A viewer may read but not apply; the token comes from the environment here.
    ok(hydro(manager, "get", "models", env={"HYDRO_TOKEN": VIEWER}))
    message = failed(hydro(manager, "apply", "-f", str(path), env={"HYDRO_TOKEN": VIEWER}))
    assert "viewer role can only read" in message and "cli-auth" in message
    assert not [key for key in manager.etcd_records() if "cli-auth" in key]


def run_hydro(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The installed `hydro` executable, as a user runs it."""
    # Nor COLUMNS: output to a pipe, as a script gets it.
    environment = {
        k: v
        for k, v in os.environ.items()
        if (not k.startswith("HYDRO_") or k == "HYDRO_TEST_SESSION") and k not in ("COLUMNS", "LINES")
    }
    environment.update(env or {})
    return subprocess.run([str(HYDRO), *args], capture_output=True, text=True, timeout=60, env=environment)


def test_hydro_executable_reads_the_credentials_file(manager: Manager, tmp_path: Path) -> None:
    with manager.client() as client:
        client.push_model("cli-exe", model_folder(tmp_path))
    result = run_hydro("get", "models", "cli-exe", "-o", "json", "--data-dir", str(manager.cli_dir))
    assert result.returncode == 0, result.stderr
    assert [v["version"] for v in json.loads(result.stdout)[0]["versions"]] == [1]
    # The environment wins over the file (and the file's token is still used).
    result = run_hydro("status", "-o", "yaml", "--data-dir", str(manager.cli_dir), env={"HYDRO_API_URL": manager.url})
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["api"]["status"] == "ok"


def test_a_table_piped_to_another_program_keeps_each_row_on_one_line(manager: Manager, tmp_path: Path) -> None:
    # As kubectl's: `hydro get models | grep NAME` finds the whole row, digest included, however long.
    name = "cli-piped-model-with-a-name-long-enough-to-wrap"
    with manager.client() as client:
        record = client.push_model(name, model_folder(tmp_path))
    result = run_hydro("get", "models", name, "--data-dir", str(manager.cli_dir))
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    assert len(rows) == 2 and rows[1][:4] == [name, "1", "python", record["artifact"]["digest"][:19]]


def test_connection_refused_says_where_and_how_to_start(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = run_hydro("get", "models", "--api", url, "--data-dir", str(tmp_path))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: cannot reach the manager API at {url} (from --api or HYDRO_API_URL): connection refused. "
        "Start the stack with `hydro up`, or pass --api URL / set HYDRO_API_URL."
    ]
    # The address from the environment, and no credentials file: still one line saying where it tried.
    result = run_hydro("status", "--data-dir", str(tmp_path / "empty"), env={"HYDRO_API_URL": url})
    assert result.returncode == 1 and f"at {url} (from --api or HYDRO_API_URL)" in result.stderr


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The only line of a failed `hydro` run: exit 1, nothing on stdout, one `error:` line (no traceback)."""
    assert result.returncode == 1 and result.stdout == "", (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_get_of_a_name_that_matches_nothing_fails(manager: Manager) -> None:
    for kind, problem in [
        ("models", "model 'cli-ghost' not found"),
        ("apps", "application 'cli-ghost' not found"),
        ("deploy", "no deployment of model 'cli-ghost'"),
        ("proxies", "proxy 'cli-ghost' not found"),
    ]:
        assert problem in failed(hydro(manager, "get", kind, "cli-ghost"))
    assert "deployment cli-ghost:3 not found" in failed(hydro(manager, "get", "deploy", "cli-ghost:3", "-o", "json"))


def test_bad_files_are_one_line_each(manager: Manager, tmp_path: Path) -> None:
    broken = model_folder(tmp_path, "cli-broken")
    (broken / "serving.yaml").write_text("runtime: [python\n")
    assert "serving.yaml" in failed(hydro(manager, "model", "push", str(broken)))
    no_file = model_folder(tmp_path, "cli-nofile")
    (no_file / "model.py").unlink()
    assert "model.py" in failed(hydro(manager, "model", "push", str(no_file)))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert str(empty) in failed(hydro(manager, "apply", "-f", str(empty)))
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    assert f"{listed}: document 1" in failed(hydro(manager, "apply", "-f", str(listed)))
    assert not [key for key in manager.etcd_records() if "cli-broken" in key or "cli-nofile" in key]
    missing = tmp_path / "missing"
    assert f"error: {missing}: not a directory" in failed(hydro(manager, "model", "push", str(missing)))
    # predict reads its file before calling anything: no ingress needed to be told the file is missing.
    unread = CliRunner().invoke(app, ["predict", "iris", "--data", f"@{missing}.json"])
    assert unread.exit_code == 1 and unread.stderr.strip() == (
        f"error: --data {missing}.json: cannot read: No such file or directory"
    )


def test_an_unknown_host_is_named_not_called_refused(tmp_path: Path) -> None:
    line = one_error_line(run_hydro("get", "models", "--api", "http://no-such-host.invalid:8081", "--data-dir", "."))
    assert "at http://no-such-host.invalid:8081" in line and "connection refused" not in line


def test_no_token_anywhere_says_where_it_looked(manager: Manager, tmp_path: Path) -> None:
    # As examples/ once said: `hydro apply -f pipeline.yaml` from inside examples/iris-pipeline, far from .hydro.
    line = one_error_line(run_hydro("get", "models", "--api", manager.url, "--data-dir", str(tmp_path / ".hydro")))
    assert line.startswith("error: missing bearer token"), line
    assert line.endswith(
        f"(HTTP 401; token from nowhere: no --token, no HYDRO_TOKEN, no {tmp_path / '.hydro' / 'credentials.json'}; "
        "run where `hydro up` runs, or pass --data-dir)"
    ), line


def test_a_damaged_credentials_file_is_named(manager: Manager, tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    path.write_text("{not json")
    line = one_error_line(run_hydro("status", "--data-dir", str(tmp_path)))
    assert line.startswith(f"error: {path}: ") and "--token" in line
    # With both --api and --token the file is not needed, so its damage does not matter.
    ok_run = run_hydro(
        "get", "models", "--api", manager.url, "--token", manager.admin_token, "--data-dir", str(tmp_path)
    )
    assert ok_run.returncode == 0, ok_run.stderr


def test_a_server_that_is_not_the_manager_or_the_ingress_is_one_line(tmp_path: Path) -> None:
    # A real HTTP server that is neither: 200 with plain text for /healthz, HTML error pages for everything else.
    www = tmp_path / "www"
    www.mkdir()
    (www / "healthz").write_text("hello\n")
    port = free_port()
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(www)]
    process = ChildProcess("http.server", argv, log_path=tmp_path / "http.log").start()
    try:
        url = f"http://127.0.0.1:{port}"
        process.wait_ready(lambda: http_ok(f"{url}/healthz"), 30)
        common = ("--api", url, "--token", "t", "--data-dir", str(tmp_path))
        for args in [("status",), ("get", "models"), ("describe", "model", "iris")]:
            assert f"is {url} the manager API?" in one_error_line(run_hydro(*args, *common))
        line = one_error_line(run_hydro("predict", "iris", "--data", "[]", "--ingress", url))
        assert "HTTP 501" in line and f"is {url} the ingress?" in line
    finally:
        process.stop()


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[str]:
    """A real OIP runtime serving the doubling model as `cli-double` version 1; its REST URL."""
    folder = model_folder(tmp_path, "runtime")
    grpc_port, http_port = free_port(), free_port()
    argv = [sys.executable, "-m", "runtimes", "--model-dir", str(folder), "--name", "cli-double", "--version", "1"]
    argv += ["--grpc-port", str(grpc_port), "--http-port", str(http_port)]
    process = ChildProcess("runtime", argv, log_path=tmp_path / "runtime.log").start()
    try:
        url = f"http://127.0.0.1:{http_port}"
        process.wait_ready(lambda: http_ok(f"{url}/v2/health/ready"), 60)
        yield url
    finally:
        process.stop()


def test_predict_prints_outputs(runtime: str, tmp_path: Path) -> None:
    request = {"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]}]}
    runner = CliRunner()
    call = ["predict", "cli-double", "--ingress", runtime]
    answer = runner.invoke(app, [*call, "--data", json.dumps(request), "-o", "json"])
    assert answer.exit_code == 0, answer.stderr
    outputs = json.loads(answer.stdout)["outputs"]
    assert [(o["name"], o["data"]) for o in outputs] == [("y", [2.0, 4.0, 6.0])]

    # A bare list of tensors from a file, against a versioned path; a table for people.
    (tmp_path / "req.json").write_text(json.dumps(request["inputs"]))
    text = runner.invoke(app, [*call, "--model-version", "1", "--data", f"@{tmp_path / 'req.json'}"])
    assert text.exit_code == 0, text.stderr
    assert "cli-double version 1" in text.stdout and "[2.0, 4.0, 6.0]" in text.stdout

    bad = {"inputs": [{"name": "nope", "shape": [1], "datatype": "FP32", "data": [1]}]}
    refused = runner.invoke(app, [*call, "--data", json.dumps(bad)])
    assert refused.exit_code == 1 and "nope" in refused.stderr and "HTTP 400" in refused.stderr
    garbled = runner.invoke(app, [*call, "--data", "{not json"])
    assert garbled.exit_code == 1 and "--data is not valid JSON" in garbled.stderr

    nowhere = f"http://127.0.0.1:{free_port()}"
    down = runner.invoke(app, ["predict", "cli-double", "--ingress", nowhere, "--data", json.dumps(request)])
    assert down.exit_code == 1
    assert f"cannot reach the ingress at {nowhere} (connection refused)" in down.stderr


def test_the_ingress_and_the_manager_mistaken_for_each_other_are_named(
    manager: Manager, runtime: str, tmp_path: Path
) -> None:
    # Both answer an unknown path with a JSON {"error": ...} (the ingress maps Envoy's replies to it), so the
    # error alone looked like the right server refusing a name; the ports are neighbours (8080, 8081).
    line = one_error_line(run_hydro("get", "models", "--api", runtime, "--token", "t", "--data-dir", str(tmp_path)))
    assert line.startswith(f"error: {runtime} (from --api or HYDRO_API_URL) answered HTTP 404 (")
    assert line.endswith(f"and has no /healthz: is {runtime} the manager API?")
    # The manager's own 404 for a name it does not know stays the API's words.
    assert failed(hydro(manager, "get", "models", "cli-nobody")).strip() == "error: model 'cli-nobody' not found"

    line = one_error_line(run_hydro("predict", "iris", "--data", "[]", "--ingress", manager.url))
    assert line == (
        f"error: no such endpoint: POST /v2/models/iris/infer (HTTP 404 from {manager.url}/v2/models/iris/infer, "
        f"which has no /v2/health/live: is {manager.url} the ingress?)"
    )
    # An OIP server's own 404 (a model it does not serve) stays its words.
    line = one_error_line(run_hydro("predict", "cli-nobody", "--data", "[]", "--ingress", runtime))
    assert "cli-nobody" in line and "the ingress?" not in line


def test_predict_calls_a_plain_text_answer_not_an_oip_one(manager: Manager, tmp_path: Path) -> None:
    # etcd answers an unknown path with "404 page not found" as text/plain: not an OIP error, whatever its length.
    etcd = f"http://{manager.etcd.endpoint}"
    line = one_error_line(run_hydro("predict", "iris", "--data", "[]", "--ingress", etcd))
    assert line == (
        f"error: HTTP 404 from {etcd}/v2/models/iris/infer is not an Open Inference Protocol answer "
        f"(404 page not found): is {etcd} the ingress?"
    )


def test_the_kubectl_like_commands_do_not_load_the_stack() -> None:
    # Every `hydro` command imports every command module; `up` and `agent` used to bring boto3, numpy and the
    # etcd client with them: half of the second each `hydro get` spent before its first request.
    probe = "import sys, manager_api.cli; print([m for m in ('boto3', 'numpy', 'aetcd') if m in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr


def test_help_says_where_defaults_come_from() -> None:
    # "[default: ...]" written inside a help text is Rich markup: the help screen used to drop it silently.
    for command, default in [(["get"], "from the credentials file"), (["model", "push"], "the folder's name")]:
        result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0 and f"[default: ({default})]" in result.stdout, result.stdout


def test_agent_refuses_an_advertise_address_that_is_not_an_ip(tmp_path: Path) -> None:
    common = ["agent", "--node", "h1", "--manager", "http://127.0.0.1:1", "--data-dir", str(tmp_path)]
    refused = CliRunner().invoke(app, [*common, "--advertise-address", "node-1.example"])
    assert refused.exit_code == 2
    assert "must be an IP address" in refused.stderr and "'node-1.example'" in refused.stderr


@pytest.mark.parametrize("bad", ["0", "-1", "3600", "soon"])
def test_agent_refuses_an_etcd_timeout_that_is_not_a_deadline(tmp_path: Path, bad: str) -> None:
    common = ["agent", "--node", "h1", "--manager", "http://127.0.0.1:1", "--data-dir", str(tmp_path)]
    refused = CliRunner().invoke(app, [*common, "--advertise-address", "127.0.0.1", "--etcd-timeout", bad])
    assert refused.exit_code == 2
    assert "--etcd-timeout" in refused.stderr, refused.stderr
