"""Bearer tokens on every /api/v1 route, checked against a real manager process: none, viewer and admin."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from manager_under_test import raw_request

from manager_api.auth import TokenStore, hash_token, write_token_file
from manager_api.credentials import ensure_admin_credentials, load_credentials
from manager_api.etcd_server import EtcdServer
from manager_api.ports import free_port
from manager_api.processes import ChildProcess, http_ok

ADMIN = "admin-token-for-tests"
VIEWER = "viewer-token-for-tests"


@pytest.fixture(scope="module")
def manager_url(etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data_dir = tmp_path_factory.mktemp("manager-auth")
    tokens = data_dir / "tokens.json"
    write_token_file(tokens, {"ops": ("admin", ADMIN), "dashboards": ("viewer", VIEWER)})
    port = free_port()
    process = ChildProcess(
        "manager_api",
        [
            *(sys.executable, "-m", "manager_api", "--etcd", etcd_server.endpoint, "--prefix", "/hydro-auth-test/"),
            *("--data-dir", str(data_dir), "--port", str(port), "--tokens", str(tokens)),
        ],
        log_path=data_dir / "manager.log",
    ).start()
    try:
        url = f"http://127.0.0.1:{port}"
        process.wait_ready(lambda: http_ok(f"{url}/healthz"), 60)
        yield url
    finally:
        process.stop()


def _routes(url: str) -> list[tuple[str, str]]:
    """Every (method, concrete path) of /api/v1 in the manager's own OpenAPI document."""
    spec = httpx.get(f"{url}/openapi.json").json()
    routes = []
    for path, methods in spec["paths"].items():
        if not path.startswith("/api/v1"):
            continue
        # {version} first: the catch-all would make it "nothing-here", a 422 before the route's own code runs.
        concrete = re.sub(r"\{[a-z_]+\}", "nothing-here", re.sub(r"\{version\}", "1", path))
        routes.extend((method.upper(), concrete) for method in methods)
    return routes


def _call(url: str, method: str, path: str, token: str | None) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    with httpx.stream(method, url + path, headers=headers, json={}, timeout=30) as response:
        # GET /events streams until the client leaves: its status line is the whole answer wanted here.
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            response.read()
    return response


def test_every_route_requires_a_token(manager_url: str) -> None:
    routes = _routes(manager_url)
    assert len(routes) >= 15, routes
    # Without a token the answer says how to send one; with an unknown one, that the token is unknown.
    expected = {
        None: "missing bearer token: send 'Authorization: Bearer <token>'",
        "not-a-known-token": "unknown bearer token",
    }
    for method, path in routes:
        for token, error in expected.items():
            response = _call(manager_url, method, path, token)
            assert response.status_code == 401, (method, path, token, response.text)
            assert response.json() == {"error": error}, (method, path, token)
    response = httpx.get(f"{manager_url}/api/v1/models", headers={"authorization": "Basic abc"})
    assert response.status_code == 401 and "Bearer" in response.json()["error"]


def test_viewers_read_admins_write(manager_url: str) -> None:
    for method, path in _routes(manager_url):
        viewer = _call(manager_url, method, path, VIEWER)
        admin = _call(manager_url, method, path, ADMIN)
        # Past authorization the route itself answers: never a 5xx (nothing-here names no record).
        assert admin.status_code not in (401, 403) and admin.status_code < 500, (method, path, admin.text)
        if method == "GET":
            # A viewer reads exactly what an admin reads (the event stream: its status line).
            assert viewer.status_code == admin.status_code, (method, path, viewer.text)
            if not viewer.headers.get("content-type", "").startswith("text/event-stream"):
                assert viewer.json() == admin.json(), (method, path)
        else:
            assert viewer.status_code == 403, (method, path, viewer.text)
            assert "admin" in viewer.json()["error"]


def test_a_401_says_how_to_authenticate(manager_url: str) -> None:
    # RFC 6750: a 401 carries WWW-Authenticate naming the scheme, which clients and proxies look for.
    for headers in ({}, {"authorization": "Bearer not-a-known-token"}):
        response = httpx.get(f"{manager_url}/api/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer"), response.headers


def test_the_token_is_checked_before_the_body_is_read(manager_url: str) -> None:
    # FastAPI reads and parses a body before any dependency runs: without a token, a client could make the manager
    # take in and spool an upload, and learn which fields of a body were wrong (400/422 instead of 401).
    bad = httpx.put(
        f"{manager_url}/api/v1/deployments/m/1", content=b"{bad", headers={"content-type": "application/json"}
    )
    assert bad.status_code == 401, bad.text
    port = int(manager_url.rsplit(":", 1)[1])
    head = (
        "POST /api/v1/models/m/versions HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        "Content-Length: 10000000\r\nConnection: close\r\n"
    )
    start = b'--b\r\nContent-Disposition: form-data; name="archive"; filename="m.tar.gz"\r\n\r\n\x1f\x8b'
    status, payload = raw_request(port, head, start)  # TimeoutError: the manager waited for the 10 MB
    assert status == 401, payload
    # A viewer's write is refused as early.
    status, payload = raw_request(port, head.replace("Host: x", f"Host: x\r\nAuthorization: Bearer {VIEWER}"), start)
    assert status == 403, payload


def test_health_and_docs_need_no_token(manager_url: str) -> None:
    assert httpx.get(f"{manager_url}/healthz").status_code == 200
    assert httpx.get(f"{manager_url}/openapi.json").status_code == 200


def test_token_store_keeps_hashes_only(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    write_token_file(path, {"a": ("admin", ADMIN)})
    assert ADMIN not in path.read_text() and hash_token(ADMIN) in path.read_text()
    assert path.stat().st_mode & 0o077 == 0
    store = TokenStore.load(path)
    assert store.role_of(ADMIN) == "admin" and store.role_of(VIEWER) is None


def test_credentials_survive_a_restart(tmp_path: Path) -> None:
    first, tokens = ensure_admin_credentials(tmp_path, "http://127.0.0.1:1")
    second, _ = ensure_admin_credentials(tmp_path, "http://127.0.0.1:1")
    assert first.token == second.token and load_credentials(tmp_path) == second
    assert TokenStore.load(tokens).role_of(first.token) == "admin"


def test_refuses_a_network_address_without_tokens(etcd_server: EtcdServer, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "manager_api", "--etcd", etcd_server.endpoint, "--host", "0.0.0.0"),
            *("--data-dir", str(tmp_path), "--port", str(free_port())),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "without --tokens" in result.stderr
