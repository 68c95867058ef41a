"""Traffic policies from the deployment spec, enforced by a real ingress Envoy in front of two real replicas.

One stack for the whole module: etcd, xds_control, the ingress Envoy, and two replicas (runtime + sidecar, started
by the deployer's Replica and registered in etcd under a lease) of a model that fails or slows down when told to
(tests/xds_control/controllable_model). Each test rewrites the deployment record's policies, waits until Envoy's
/config_dump holds exactly what the translator makes of them, then checks Envoy's behaviour and its stats.

The health check test stops a runtime, so it runs last (pytest keeps the file's order).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aetcd
import grpc
import httpx
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from ingress_stack import ingress_stack
from tritonclient.grpc import service_pb2

from manager_api.deployer.replica import Replica
from manager_api.etcd_server import EtcdServer
from manager_api.processes import wait_until
from protos.topology.applications import Application, Stage, Variant
from protos.topology.deployments import Deployment
from protos.topology.keys import Keys
from protos.topology.models import Artifact, ModelVersion, Signature, TensorSpec
from protos.topology.policies import Policies
from xds_control.resources.request_limits import BUFFER_FILTER, RATE_LIMIT_FILTER
from xds_control.resources.routes import WeightedTarget, application_routes, model_version_route
from xds_control.translate import cluster_name, model_cluster, request_limits, route_policies

T = TypeVar("T")
MODEL_FOLDER = Path(__file__).resolve().parent / "controllable_model"
MODEL = "ctl"
VERSION = 1
CLUSTER = cluster_name(MODEL, VERSION)
APP_REST = f"/v2/models/{MODEL}/infer"
VERSION_REST = f"/v2/models/{MODEL}/versions/{VERSION}/infer"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
SIGNATURE = Signature(
    inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 1])],
    outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1, 1])],
)


def _rest_body(x: float = 1.0, rows: int = 1) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 1], "data": [x] * rows}]}


def _without_type(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != "@type"}


def _as_dict(message: Message) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return result


@dataclass
class PolicyStack:
    """The running stack and the handles a test needs: replicas' mode files, Envoy's admin, etcd writes."""

    keys: Keys
    etcd: aetcd.Client
    loop: asyncio.AbstractEventLoop
    listen_port: int
    admin_port: int
    model_dirs: list[Path]
    replicas: list[Replica] = field(default_factory=list)
    #: The gRPC status message of the last failed grpc_infer call.
    grpc_details: str = ""

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the stack's loop (the registry's lease keep-alive lives there)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    # --- the replicas -----------------------------------------------------------------------------------------

    def set_mode(self, replica: int, mode: str) -> None:
        """Tell one replica's model how to behave from its next call on (ok, fail, fail-half, slow:<ms>)."""
        (self.model_dirs[replica] / "mode").write_text(mode)

    def set_modes(self, *modes: str) -> None:
        for index, mode in enumerate(modes):
            self.set_mode(index, mode)

    def endpoint(self, replica: int) -> tuple[str, int]:
        return ("127.0.0.1", self.replicas[replica].inbound_port)

    # --- Envoy's admin ----------------------------------------------------------------------------------------

    def admin(self, path: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5)

    def loaded_cluster(self) -> dict[str, Any] | None:
        for config in self.admin("/config_dump").json()["configs"]:
            if config["@type"].endswith(".ClustersConfigDump"):
                for entry in config.get("dynamic_active_clusters", []):
                    if entry["cluster"]["name"] == CLUSTER:
                        return _without_type(entry["cluster"])
        return None

    def loaded_routes(self) -> dict[str, dict[str, Any]]:
        routes: dict[str, dict[str, Any]] = {}
        for config in self.admin("/config_dump").json()["configs"]:
            if config["@type"].endswith(".RoutesConfigDump"):
                for entry in config.get("dynamic_route_configs", []):
                    for vhost in entry["route_config"].get("virtual_hosts", []):
                        routes.update({route["name"]: route for route in vhost.get("routes", [])})
        return routes

    def host_health(self) -> dict[tuple[str, int], dict[str, Any]]:
        """Each host of the model version's cluster and its health flags, as Envoy's /clusters reports them."""
        hosts: dict[tuple[str, int], dict[str, Any]] = {}
        for status in self.admin("/clusters?format=json").json().get("cluster_statuses", []):
            if status["name"] != CLUSTER:
                continue
            for host in status.get("host_statuses", []):
                address = host["address"]["socket_address"]
                hosts[(address["address"], int(address["port_value"]))] = host.get("health_status", {})
        return hosts

    def healthy(self, replica: int) -> bool:
        flags = self.host_health().get(self.endpoint(replica))
        if flags is None:
            return False
        return flags.get("eds_health_status") == "HEALTHY" and not any(v is True for v in flags.values())

    def stat(self, name: str) -> int:
        """One counter or gauge of Envoy's /stats (0 when it does not exist yet)."""
        for line in self.admin("/stats").text.splitlines():
            key, _, value = line.partition(": ")
            if key == name and value.strip().lstrip("-").isdigit():
                return int(value)
        return 0

    # --- policies ---------------------------------------------------------------------------------------------

    def apply(self, policies: Policies | None) -> None:
        """Store the deployment with ``policies`` (None: a record without the field) and wait until Envoy has
        loaded exactly what the translator makes of them, with both replicas healthy again."""
        record = Deployment(model=MODEL, version=VERSION, replicas=2, policies=policies or Policies())
        value = record.model_dump(mode="json")
        if policies is None:
            del value["policies"]
        self.run(self.etcd.put(self.keys.deployment(MODEL, VERSION).encode(), json.dumps(value).encode()))
        effective = policies or Policies()
        cluster = _as_dict(model_cluster(MODEL, VERSION, effective))
        limits = request_limits(MODEL, VERSION, effective)
        route_policy = route_policies([effective])
        routes = {
            route["name"]: route
            for route in (
                _as_dict(route)
                for route in [
                    model_version_route(MODEL, VERSION, CLUSTER, route_policy, limits),
                    *application_routes(MODEL, [WeightedTarget(CLUSTER, 100, limits)], route_policy),
                ]
            )
        }

        def loaded() -> bool:
            held = self.loaded_routes()
            return self.loaded_cluster() == cluster and all(held.get(name) == route for name, route in routes.items())

        wait_until(loaded, 15, "Envoy to load the deployment's policies")
        wait_until(lambda: self.healthy(0) and self.healthy(1), 15, "both replicas healthy in the new cluster")

    # --- clients ----------------------------------------------------------------------------------------------

    def rest(self, path: str = APP_REST, x: float = 1.0, rows: int = 1, timeout: float = 10) -> httpx.Response:
        return httpx.post(f"http://127.0.0.1:{self.listen_port}{path}", json=_rest_body(x, rows), timeout=timeout)

    def grpc_infer(self, x: float = 1.0, rows: int = 1, timeout: float = 10) -> grpc.StatusCode:
        """One ModelInfer through the ingress (application chosen by header); the status code it ended with."""
        request = service_pb2.ModelInferRequest(model_name=MODEL)
        tensor = request.inputs.add(name="x", datatype="FP32", shape=[rows, 1])
        tensor.contents.fp32_contents.extend([x] * rows)
        with grpc.insecure_channel(f"127.0.0.1:{self.listen_port}") as channel:
            call = channel.unary_unary(
                MODEL_INFER,
                request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                response_deserializer=service_pb2.ModelInferResponse.FromString,
            )
            try:
                response = call(request, timeout=timeout, metadata=(("x-hydro-model", MODEL),))
            except grpc.RpcError as exc:
                code: grpc.StatusCode = exc.code()
                self.grpc_details = exc.details() or ""
                return code
        assert list(response.outputs[0].contents.fp32_contents or []) or response.raw_output_contents
        return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def stack(etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyStack]:
    work = tmp_path_factory.mktemp("policies")
    # Each replica gets its own copy of the model folder, hence its own mode file.
    model_dirs = []
    for index in range(2):
        folder = work / f"model-{index}"
        shutil.copytree(MODEL_FOLDER, folder, ignore=shutil.ignore_patterns("__pycache__"))
        model_dirs.append(folder)
    with ingress_stack(etcd_server.endpoint, work, xds_args=["--log-level", "INFO"]) as mesh:
        mesh.put_model(MODEL, VERSION, SIGNATURE, app=MODEL)
        replicas = mesh.start_replicas(MODEL, VERSION, model_dirs)
        yield PolicyStack(mesh.keys, mesh.etcd, mesh.loop, mesh.listen_port, mesh.admin_port, model_dirs, replicas)


@pytest.fixture(autouse=True)
def healthy_models(stack: PolicyStack) -> Iterator[None]:
    """Every test starts and ends with both models answering normally."""
    stack.set_modes("ok", "ok")
    yield
    stack.set_modes("ok", "ok")


def test_record_without_policies_gets_the_defaults(stack: PolicyStack) -> None:
    stack.apply(None)
    cluster = stack.loaded_cluster()
    assert cluster is not None
    thresholds = cluster["circuit_breakers"]["thresholds"][0]
    assert thresholds["max_requests"] == 1024 and thresholds["max_pending_requests"] == 1024
    assert thresholds["retry_budget"]["budget_percent"]["value"] == 20
    assert "outlier_detection" not in cluster and "health_checks" not in cluster
    route = stack.loaded_routes()["app|ctl|rest"]["route"]
    assert route["timeout"] == "60s"
    assert (
        route["retry_policy"]["retry_on"] == "connect-failure,refused-stream,reset,gateway-error,unavailable,cancelled"
    )
    assert route["retry_policy"]["num_retries"] == 2
    for path in (APP_REST, VERSION_REST):
        response = stack.rest(path, x=3.0)
        assert response.status_code == 200, response.text
        assert response.json()["outputs"][0]["data"] == [3.0]
    assert stack.grpc_infer() == grpc.StatusCode.OK


def test_timeout_answers_504_and_deadline_exceeded(stack: PolicyStack) -> None:
    stack.apply(Policies.model_validate({"timeout_ms": 300, "retries": {"attempts": 0}}))
    assert stack.loaded_routes()["app|ctl|rest"]["route"]["timeout"] == "0.300s"
    stack.set_modes("slow:2500", "slow:2500")
    for path in (APP_REST, VERSION_REST):
        started = time.monotonic()
        response = stack.rest(path)
        assert time.monotonic() - started < 2.0, "the ingress must not wait for the slow model"
        assert response.status_code == 504
        assert response.headers["content-type"] == "application/json"
        assert "timeout" in response.json()["error"]
    started = time.monotonic()
    assert stack.grpc_infer() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "timeout" in stack.grpc_details
    assert time.monotonic() - started < 2.0
    assert stack.stat(f"cluster.{CLUSTER}.upstream_rq_timeout") >= 3


def test_retries_hide_a_replica_that_fails_half_its_calls(stack: PolicyStack) -> None:
    stack.apply(Policies.model_validate({"retries": {"attempts": 0}}))
    stack.set_modes("fail-half", "ok")
    without = [stack.rest().status_code for _ in range(24)]
    assert 500 in without, "without retries the failing replica's errors reach the client"
    assert 200 in without

    stack.apply(Policies.model_validate({"retries": {"attempts": 2, "retry_on": "5xx,internal"}}))
    assert stack.loaded_routes()["app|ctl|grpc"]["route"]["retry_policy"]["retry_on"] == "5xx,internal"
    retried_before = stack.stat(f"cluster.{CLUSTER}.upstream_rq_retry")
    statuses = [stack.rest().status_code for _ in range(24)]
    assert statuses == [200] * 24
    codes = [stack.grpc_infer() for _ in range(24)]
    assert codes == [grpc.StatusCode.OK] * 24
    assert stack.stat(f"cluster.{CLUSTER}.upstream_rq_retry") - retried_before >= 6


def test_per_try_timeout_and_retry_budget(stack: PolicyStack) -> None:
    policies = Policies.model_validate(
        {
            "timeout_ms": 5000,
            "retries": {
                "attempts": 1,
                "per_try_timeout_ms": 300,
                "retry_on": ["5xx", "deadline-exceeded"],
                "budget_percent": 50,
            },
        }
    )
    stack.apply(policies)
    cluster = stack.loaded_cluster()
    assert cluster is not None
    budget = cluster["circuit_breakers"]["thresholds"][0]["retry_budget"]
    assert budget["budget_percent"]["value"] == 50 and budget["min_retry_concurrency"] == 3
    assert stack.loaded_routes()["app|ctl|rest"]["route"]["retry_policy"]["per_try_timeout"] == "0.300s"
    stack.set_modes("slow:2000", "ok")
    for _ in range(6):
        started = time.monotonic()
        response = stack.rest()
        assert response.status_code == 200, response.text
        assert time.monotonic() - started < 1.8, "a slow try is abandoned after 300 ms and retried elsewhere"
    for _ in range(4):
        assert stack.grpc_infer() == grpc.StatusCode.OK
    assert stack.stat(f"cluster.{CLUSTER}.upstream_rq_per_try_timeout") >= 2


def _overflows(stack: PolicyStack) -> int:
    # Over max_requests on an HTTP/2 cluster with a connection open counts as "active"; over
    # max_pending_requests while connecting counts as "pending".
    return sum(stack.stat(f"cluster.{CLUSTER}.upstream_rq_{kind}_overflow") for kind in ("active", "pending"))


def test_circuit_breaker_rejects_overflow_with_an_oip_error(stack: PolicyStack) -> None:
    stack.apply(
        Policies.model_validate(
            {"retries": {"attempts": 0}, "circuit_breaker": {"max_requests": 1, "max_pending_requests": 1}}
        )
    )
    cluster = stack.loaded_cluster()
    assert cluster is not None
    assert cluster["circuit_breakers"]["thresholds"][0]["max_requests"] == 1
    stack.set_modes("slow:600", "slow:600")
    overflow_before = _overflows(stack)
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: stack.rest(), range(8)))
    statuses = [response.status_code for response in responses]
    assert 200 in statuses
    rejected = [response for response in responses if response.status_code == 503]
    assert rejected, f"expected overflow rejections, got {statuses}"
    for response in rejected:
        assert response.headers["content-type"] == "application/json"
        assert response.headers.get("x-envoy-overloaded") == "true"
        assert "overflow" in response.json()["error"]
    assert _overflows(stack) >= overflow_before + len(rejected)


def test_outlier_detection_ejects_a_failing_replica(stack: PolicyStack) -> None:
    stack.apply(
        Policies.model_validate(
            {
                "retries": {"attempts": 0},
                "outlier_detection": {
                    "consecutive_5xx": 3,
                    "interval_ms": 500,
                    "base_ejection_ms": 60_000,
                    "max_ejection_percent": 50,
                },
            }
        )
    )
    cluster = stack.loaded_cluster()
    assert cluster is not None
    assert cluster["outlier_detection"]["consecutive_5xx"] == 3
    stack.set_modes("fail", "ok")

    def ejected() -> bool:
        stack.rest()
        return stack.stat(f"cluster.{CLUSTER}.outlier_detection.ejections_active") == 1

    wait_until(ejected, 10, "the failing replica to be ejected")
    assert stack.host_health()[stack.endpoint(0)].get("failed_outlier_check") is True
    assert stack.healthy(1)
    statuses = [stack.rest().status_code for _ in range(20)]
    assert statuses == [200] * 20
    assert [stack.grpc_infer() for _ in range(6)] == [grpc.StatusCode.OK] * 6


def test_rate_limit_answers_429_and_resource_exhausted(stack: PolicyStack) -> None:
    stack.apply(Policies.model_validate({"rate_limit": {"requests_per_second": 1, "burst": 3}}))
    route = stack.loaded_routes()["app|ctl|rest"]
    bucket = route["typed_per_filter_config"][RATE_LIMIT_FILTER]["token_bucket"]
    assert bucket["max_tokens"] == 3 and bucket["tokens_per_fill"] == 1
    responses = [stack.rest() for _ in range(10)]
    statuses = [response.status_code for response in responses]
    # Three tokens, and at most one or two more refilled while the ten calls run.
    assert statuses[:3] == [200, 200, 200] and statuses.count(429) >= 4, statuses
    limited = next(response for response in responses if response.status_code == 429)
    assert limited.headers["content-type"] == "application/json"
    assert "rate limit" in limited.json()["error"]
    codes = [stack.grpc_infer() for _ in range(10)]
    assert codes[:3] == [grpc.StatusCode.OK] * 3 and codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 4, codes
    assert "rate limit" in stack.grpc_details
    assert stack.stat("model_ctl_1.http_local_rate_limit.rate_limited") >= 8


def test_max_request_size_answers_413(stack: PolicyStack) -> None:
    stack.apply(Policies.model_validate({"max_request_bytes": 2048}))
    route = stack.loaded_routes()["model|ctl|1"]
    assert route["typed_per_filter_config"][BUFFER_FILTER]["buffer"]["max_request_bytes"] == 2048
    assert stack.rest(rows=4).status_code == 200
    for path in (APP_REST, VERSION_REST):
        too_large = stack.rest(path, rows=2000)
        assert too_large.status_code == 413
        assert too_large.headers["content-type"] == "application/json"
        assert "max_request_bytes" in too_large.json()["error"]
    assert stack.grpc_infer(rows=4) == grpc.StatusCode.OK
    # 40 kB: several HTTP/2 DATA frames (Envoy's buffer filter checks the limit on every frame but the last;
    # see docs/traffic_policies.md).
    assert stack.grpc_infer(rows=10_000) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_request_bytes" in stack.grpc_details


def test_application_variants_merge_route_policies_and_keep_their_own_limits(stack: PolicyStack) -> None:
    stack.apply(Policies.model_validate({"timeout_ms": 2000, "rate_limit": {"requests_per_second": 50}}))
    keys = stack.keys
    artifact = Artifact(digest="sha256:" + "0" * 64, uri="file:///nowhere", size=0)
    canary = ModelVersion(name=MODEL, version=2, runtime="python", artifact=artifact, signature=SIGNATURE)
    canary_policies = Policies.model_validate({"timeout_ms": 9000, "max_request_bytes": 4096})
    canary_deployment = Deployment(model=MODEL, version=2, replicas=0, policies=canary_policies)
    split = Application(
        name="split",
        stages=[
            Stage(variants=[Variant(model=MODEL, version=1, weight=90), Variant(model=MODEL, version=2, weight=10)])
        ],
    )
    writes = {
        keys.model_version(MODEL, 2): canary.model_dump_json(),
        keys.deployment(MODEL, 2): canary_deployment.model_dump_json(),
        keys.application("split"): split.model_dump_json(),
    }
    try:
        for key, value in writes.items():
            stack.run(stack.etcd.put(key.encode(), value.encode()))
        wait_until(lambda: "app|split|rest" in stack.loaded_routes(), 15, "the split application's routes in Envoy")
        route = stack.loaded_routes()["app|split|rest"]
        assert route["route"]["timeout"] == "9s", "the longest timeout of the variants"
        assert "typed_per_filter_config" not in route
        limits = {
            c["name"]: c.get("typed_per_filter_config", {}) for c in route["route"]["weighted_clusters"]["clusters"]
        }
        assert set(limits[CLUSTER]) == {RATE_LIMIT_FILTER}
        assert set(limits[cluster_name(MODEL, 2)]) == {BUFFER_FILTER}
    finally:
        for key in reversed(list(writes)):
            stack.run(stack.etcd.delete(key.encode()))
    wait_until(lambda: "app|split|rest" not in stack.loaded_routes(), 15, "the split application's removal")


def test_active_health_check_marks_a_stopped_runtime_unhealthy(stack: PolicyStack) -> None:
    stack.apply(
        Policies.model_validate(
            {"health_check": {"interval_ms": 200, "timeout_ms": 500, "unhealthy_threshold": 2, "healthy_threshold": 1}}
        )
    )
    cluster = stack.loaded_cluster()
    assert cluster is not None
    check = cluster["health_checks"][0]
    assert check["grpc_health_check"]["service_name"] == "inference.GRPCInferenceService"
    assert stack.stat(f"cluster.{CLUSTER}.health_check.success") > 0
    # The sidecar stays up; only the runtime behind it goes, as when a model server dies or shuts down.
    runtime = stack.replicas[0].runtime
    assert runtime is not None
    runtime.stop(5.0)
    wait_until(
        lambda: stack.host_health()[stack.endpoint(0)].get("failed_active_health_check") is True,
        10,
        "the stopped runtime's replica to fail its health checks",
    )
    assert stack.healthy(1)
    assert [stack.rest().status_code for _ in range(10)] == [200] * 10
    assert stack.stat(f"cluster.{CLUSTER}.health_check.failure") > 0
