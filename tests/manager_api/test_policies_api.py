"""Deployment traffic policies through the manager's REST API (real etcd, real `python -m manager_api`).

Policies are optional, stored in the deployment record, kept across a scale-only PUT, and every bad value is a 422
that names the field (``policies.retries.attempts``...) and leaves etcd as it was.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from typing import Any

import aetcd
import httpx
import pytest
from framework_models import python_identity

from manager_api.client import pack_model_folder
from manager_api.etcd_server import EtcdServer
from manager_api.ports import free_port
from manager_api.processes import ChildProcess, http_ok
from protos.topology.deployments import Deployment
from protos.topology.keys import Keys
from protos.topology.policies import DEFAULT_RETRY_ON, Policies
from xds_control.topology import Topology

PREFIX = "/hydro-policies-api-test/"


class Manager:
    def __init__(self, url: str, etcd: EtcdServer) -> None:
        self.http = httpx.Client(base_url=url + "/api/v1", timeout=30)
        self.etcd = etcd

    def stored(self) -> dict[str, Any]:
        """Every value under the test prefix, as JSON."""

        async def read() -> dict[str, Any]:
            host, port = self.etcd.endpoint.rsplit(":", 1)
            async with aetcd.Client(host=host, port=int(port)) as client:
                return {kv.key.decode(): json.loads(kv.value) for kv in await client.get_prefix(PREFIX.encode())}

        return asyncio.run(read())


@pytest.fixture(scope="module")
def manager(etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Manager]:
    data_dir = tmp_path_factory.mktemp("manager-policies")
    port = free_port()
    process = ChildProcess(
        "manager_api",
        [
            sys.executable,
            "-m",
            "manager_api",
            "--etcd",
            etcd_server.endpoint,
            "--prefix",
            PREFIX,
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
        manager = Manager(url, etcd_server)
        folder = python_identity(data_dir / "model")
        uploaded = manager.http.post(
            "/models/guarded/versions", files={"archive": ("m.tar.gz", pack_model_folder(folder))}
        )
        assert uploaded.status_code == 201, uploaded.text
        yield manager
        manager.http.close()
    finally:
        process.stop()


def assert_error(response: httpx.Response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    message = response.json()["error"]
    for fragment in fragments:
        assert fragment in message, message


def test_policies_default_when_omitted(manager: Manager) -> None:
    created = manager.http.put("/deployments/guarded/1", json={"replicas": 1})
    assert created.status_code == 200, created.text
    policies = created.json()["policies"]
    assert policies["timeout_ms"] == 60_000
    assert policies["retries"] == {
        "attempts": 2,
        "per_try_timeout_ms": None,
        "retry_on": list(DEFAULT_RETRY_ON),
        "budget_percent": 20.0,
    }
    assert policies["circuit_breaker"] == {"max_requests": 1024, "max_pending_requests": 1024, "max_connections": 1024}
    for optional in ("outlier_detection", "health_check", "rate_limit", "max_request_bytes"):
        assert policies[optional] is None


def test_policies_are_stored_and_kept_when_scaling(manager: Manager) -> None:
    spec = {
        "replicas": 2,
        "policies": {
            "timeout_ms": 2500,
            "retries": {"attempts": 3, "per_try_timeout_ms": 800, "retry_on": "5xx, unavailable", "budget_percent": 50},
            "circuit_breaker": {"max_requests": 10},
            "outlier_detection": {"consecutive_5xx": 2},
            "health_check": {"interval_ms": 2000},
            "rate_limit": {"requests_per_second": 100, "burst": 150},
            "max_request_bytes": 1048576,
        },
    }
    put = manager.http.put("/deployments/guarded/1", json=spec)
    assert put.status_code == 200, put.text
    policies = put.json()["policies"]
    assert policies["retries"]["retry_on"] == ["5xx", "unavailable"], "a comma-separated string is accepted"
    assert policies["circuit_breaker"]["max_pending_requests"] == 1024, "unset fields take their defaults"
    assert policies["outlier_detection"]["max_ejection_percent"] == 10
    assert policies["health_check"]["timeout_ms"] == 1000
    stored = manager.stored()[Keys(PREFIX).deployment("guarded", 1)]
    assert stored["policies"] == policies

    scaled = manager.http.put("/deployments/guarded/1", json={"replicas": 3})
    assert scaled.json()["replicas"] == 3 and scaled.json()["policies"] == policies
    assert manager.http.get("/deployments/guarded/1").json()["policies"] == policies

    reset = manager.http.put("/deployments/guarded/1", json={"replicas": 3, "policies": {}})
    assert reset.json()["policies"] == Policies().model_dump(mode="json"), "an empty object means the defaults"


@pytest.mark.parametrize(
    ("policies", "fragments"),
    [
        ({"timeout_ms": 0}, ["policies.timeout_ms"]),
        ({"timeout_ms": "fast"}, ["policies.timeout_ms"]),
        ({"timeout": 5000}, ["policies.timeout", "not permitted"]),
        ({"retries": {"attempts": -1}}, ["policies.retries.attempts"]),
        ({"retries": {"attempt": 1}}, ["policies.retries.attempt"]),
        ({"retries": {"retry_on": ["5xx", "teapot"]}}, ["policies.retries.retry_on", "teapot"]),
        ({"retries": {"retry_on": []}}, ["policies.retries.retry_on"]),
        ({"retries": {"budget_percent": 101}}, ["policies.retries.budget_percent"]),
        ({"timeout_ms": 1000, "retries": {"per_try_timeout_ms": 5000}}, ["retries.per_try_timeout_ms", "timeout_ms"]),
        ({"circuit_breaker": {"max_requests": 0}}, ["policies.circuit_breaker.max_requests"]),
        ({"outlier_detection": {"max_ejection_percent": 150}}, ["policies.outlier_detection.max_ejection_percent"]),
        ({"health_check": {"unhealthy_threshold": 0}}, ["policies.health_check.unhealthy_threshold"]),
        ({"rate_limit": {}}, ["policies.rate_limit.requests_per_second"]),
        ({"rate_limit": {"requests_per_second": 10, "burst": 0}}, ["policies.rate_limit.burst"]),
        ({"max_request_bytes": 0}, ["policies.max_request_bytes"]),
        ([], ["policies"]),
    ],
)
def test_bad_policies_are_refused_and_change_nothing(manager: Manager, policies: object, fragments: list[str]) -> None:
    before = manager.stored()
    response = manager.http.put("/deployments/guarded/1", json={"replicas": 1, "policies": policies})
    assert_error(response, 422, *fragments)
    assert manager.stored() == before


def test_records_without_policies_still_parse() -> None:
    """Deployments written before policies existed get the defaults, in the manager and in xds_control."""
    old = json.dumps(
        {"schema_version": 1, "model": "m", "version": 1, "replicas": 2, "created_at": "x", "updated_at": "x"}
    )
    assert Deployment.model_validate_json(old).policies == Policies()
    keys = Keys("/p/")
    topology = Topology.from_kvs(keys, {keys.deployment("m", 1): old.encode()}, revision=1)
    assert topology.deployments[("m", 1)].policies == Policies()
