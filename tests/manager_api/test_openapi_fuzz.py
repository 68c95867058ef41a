"""The manager against its own OpenAPI document: schemathesis generates requests for every operation.

A real `python -m manager_api` process on the session's real etcd, called with the admin token (so requests get
past authorization and reach the routes). Every answer must be below 500 and match the documented response
schema, errors included (``{"error": ...}``). Bounded: at most MAX_EXAMPLES generated cases per operation,
derandomized so a failure reproduces; the upload operation gets random bytes (refused as not an archive) and the
explicit example, never a model that would need a signature check.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from manager_api.app import create_app
from manager_api.auth import write_token_file
from manager_api.client import ManagerClient
from manager_api.etcd_server import EtcdServer
from manager_api.processes import ChildProcess, free_port, http_ok
from manager_api.settings import Settings

ADMIN = "fuzz-admin-token"
MAX_EXAMPLES = 25
SERVING_YAML = """\
runtime: python
files: [model.py]
entrypoint: model:predict
signature:
  inputs: [{name: x, datatype: FP32, shape: [-1]}]
  outputs: [{name: y, datatype: FP32, shape: [-1]}]
"""


@pytest.fixture(scope="module")
def manager_url(etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data_dir = tmp_path_factory.mktemp("manager-fuzz")
    tokens = data_dir / "tokens.json"
    write_token_file(tokens, {"fuzzer": ("admin", ADMIN)})
    port = free_port()
    process = ChildProcess(
        "manager_api",
        [
            *(sys.executable, "-m", "manager_api", "--etcd", etcd_server.endpoint, "--prefix", "/hydro-fuzz/"),
            *("--data-dir", str(data_dir), "--port", str(port), "--tokens", str(tokens)),
        ],
        log_path=data_dir / "manager.log",
    ).start()
    try:
        url = f"http://127.0.0.1:{port}"
        process.wait_ready(lambda: http_ok(f"{url}/healthz"), 60)
        _seed(url, data_dir)
        yield url
    finally:
        process.stop()


def _seed(url: str, data_dir: Path) -> None:
    """A model version, its deployment and an application, so that some generated names hit real records."""
    folder = data_dir / "seed-model"
    folder.mkdir()
    (folder / "serving.yaml").write_text(SERVING_YAML)
    (folder / "model.py").write_text("def predict(inputs):\n    return {'y': inputs['x'] * 2}\n")
    with ManagerClient(url, ADMIN) as api:
        version = int(api.push_model("iris", folder)["version"])
        api.deploy("iris", version, 0)
        api.put_application("iris", [("iris", version, 100)])


def _schema() -> Any:
    """The manager's OpenAPI document, built from the app as the server builds it (compared with /openapi.json)."""
    config = schemathesis.Config.from_dict(
        {
            "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "mode": "all"},
            "suppress-health-check": ["all"],
        }
    )
    return schemathesis.openapi.from_dict(create_app(Settings()).openapi(), config=config)


# Loaded at import rather than from the running manager's fixture: schemathesis.pytest.from_fixture does not run
# under pytest 9 (it sets Function._nodeid, which pytest 9 removed). test_the_fuzzed_document_is_the_served_one
# checks that both are the same document.
schema = _schema()


@schema.parametrize()
def test_every_operation_answers_below_500_and_as_documented(case: schemathesis.Case, manager_url: str) -> None:
    case.call_and_validate(
        base_url=manager_url,
        headers={"Authorization": f"Bearer {ADMIN}"},
        checks=[not_a_server_error, response_schema_conformance, content_type_conformance],
        timeout=30,
    )


def test_the_fuzzed_document_is_the_served_one(manager_url: str) -> None:
    assert httpx.get(f"{manager_url}/openapi.json").json() == create_app(Settings()).openapi()


def _resolve(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[1]
        node = spec["components"]["schemas"][name]
    return node


def _has_example(spec: dict[str, Any], content: dict[str, Any]) -> bool:
    """An example for the whole body, or (multipart forms) one for each of its fields."""
    keys = ("example", "examples")
    body = _resolve(spec, content.get("schema", {}))
    if any(key in content or key in body for key in keys):
        return True
    fields = [_resolve(spec, field) for field in body.get("properties", {}).values()]
    return bool(fields) and all(any(key in field for key in keys) for field in fields)


def test_every_request_body_has_an_example() -> None:
    spec = create_app(Settings()).openapi()
    missing = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for media_type, content in operation.get("requestBody", {}).get("content", {}).items():
                if not _has_example(spec, content):
                    missing.append(f"{method.upper()} {path} ({media_type})")
    assert not missing, f"request bodies without an example: {missing}"


def test_errors_are_documented_as_error_bodies(manager_url: str) -> None:
    spec = httpx.get(f"{manager_url}/openapi.json").json()
    for path, operations in spec["paths"].items():
        if not path.startswith("/api/v1"):
            continue
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "4XX" in responses, f"{method.upper()} {path} documents no 4XX answer"
            body = responses["4XX"]["content"]["application/json"]["schema"]
            assert _resolve(spec, body)["required"] == ["error"], f"{method.upper()} {path}"
