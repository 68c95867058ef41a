"""Header-less gRPC routing and large tensors through a real ingress Envoy, with tritonclient.grpc as the client.

One stack for the module: etcd, xds_control (request limit 260 MiB), the ingress Envoy, and one replica (runtime +
sidecar, started by the deployer's Replica and registered under a lease) of model ``echo`` version 1, which
returns its input. Application ``alias`` routes to it; no application is named ``echo``, so ``echo`` is reachable
by gRPC only with its version (as REST's /v2/models/echo/versions/1). No request sets a header unless the test
is about the header.

tritonclient's messages are the only OIP messages in this process: protos.inference_pb2 defines the same
``inference`` package and cannot be imported beside them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from envoy.config.route.v3 import route_pb2
from framework_models import python_identity
from google.protobuf import any_pb2
from ingress_stack import IngressStack, ingress_stack
from tritonclient.utils import InferenceServerException

from manager_api.etcd_server import EtcdServer
from manager_api.processes import wait_until
from protos.topology.applications import Application, Stage, Variant
from protos.topology.deployments import Deployment
from protos.topology.models import Signature, TensorSpec
from protos.topology.policies import Policies
from xds_control.resources.clusters import ANY_INSTANCE_CLUSTER
from xds_control.resources.headerless_grpc import INFERENCE_DESCRIPTOR_SET, MODEL_METHODS, model_methods
from xds_control.resources.type_urls import CLUSTER, ROUTE
from xds_control.snapshot import Snapshot
from xds_control.topology import Topology
from xds_control.translate import INGRESS_ROUTES, NodeInfo, ingress_snapshot

MODEL = "echo"
APP = "alias"
LIMIT_MB = 260


@dataclass
class Stack:
    """The running stack: the ingress's address and admin port, and a way to rewrite the deployment."""

    mesh: IngressStack

    @property
    def admin_port(self) -> int:
        return self.mesh.admin_port

    def deploy(self, policies: Policies) -> None:
        """Store the deployment with ``policies`` and wait until Envoy routes by name with them."""
        record = Deployment(model=MODEL, version=1, replicas=1, policies=policies)
        self.mesh.put({self.mesh.keys.deployment(MODEL, 1): record})
        expected = policies.max_request_bytes

        def loaded() -> bool:
            dump = httpx.get(f"http://127.0.0.1:{self.admin_port}/config_dump?resource=dynamic_route_configs")
            for config in dump.json()["configs"]:
                for vhost in config["route_config"].get("virtual_hosts", []):
                    for route in vhost["routes"]:
                        if route["name"] == f"app|{APP}|grpc-model_name":
                            limit = route.get("typed_per_filter_config", {}).get("envoy.filters.http.buffer")
                            held = None if limit is None else int(limit["buffer"]["max_request_bytes"])
                            return held == expected
            return False

        wait_until(loaded, 15, "Envoy to load the deployment's request limit")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.mesh.listen_port}"

    def client(self) -> triton.InferenceServerClient:
        return triton.InferenceServerClient(self.address)


@pytest.fixture(scope="module")
def stack(etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("headerless")
    model_dir = python_identity(work / "model")
    signature = Signature(
        inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1])],
        outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1])],
    )
    with ingress_stack(etcd_server.endpoint, work, xds_args=["--max-request-mb", str(LIMIT_MB)]) as mesh:
        mesh.put_model(MODEL, 1, signature, app=APP, deployment=Deployment(model=MODEL, version=1, replicas=1))
        mesh.start_replicas(MODEL, 1, [model_dir])
        running = Stack(mesh)
        wait_until(lambda: _ready_through_ingress(running), 30, "the application to answer through the ingress")
        yield running


def _ready_through_ingress(stack: Stack) -> bool:
    # An error is "not yet" to wait_until, which reports the last one if it never gets ready.
    with stack.client() as client:
        return bool(client.is_model_ready(APP))


def _input(values: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("x", [int(values.size)], "FP32")
    tensor.set_data_from_numpy(values)
    return tensor


def _failure(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


def test_infer_by_model_name_without_headers(stack: Stack) -> None:
    values = np.array([1.0, 2.5, -3.0], dtype=np.float32)
    with stack.client() as client:
        result = client.infer(APP, [_input(values)])
        np.testing.assert_array_equal(result.as_numpy("y"), values)
        response = result.get_response()
        assert (response.model_name, response.model_version) == (MODEL, "1")
        # A model version is addressed by its name and version, as /v2/models/echo/versions/1 over REST.
        result = client.infer(MODEL, [_input(values)], model_version="1")
        np.testing.assert_array_equal(result.as_numpy("y"), values)


def test_metadata_and_readiness_without_headers(stack: Stack) -> None:
    with stack.client() as client:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.get_server_metadata().name == "hydro-serving"
        assert client.is_model_ready(APP)
        assert client.is_model_ready(MODEL, "1")
        metadata = client.get_model_metadata(APP)
        assert metadata.name == MODEL
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("x", "FP32", [-1])]
        assert client.get_model_metadata(MODEL, "1").versions == ["1"]


def test_unknown_model_is_not_found_naming_it(stack: Stack) -> None:
    values = np.array([1.0], dtype=np.float32)
    with stack.client() as client:
        for call in (
            lambda: client.infer("no-such-model", [_input(values)]),
            lambda: client.get_model_metadata("no-such-model"),
            lambda: client.is_model_ready("no-such-model"),
        ):
            error = _failure(call)
            assert error.status() == "StatusCode.NOT_FOUND", error
            assert "no-such-model" in (error.message() or ""), error
        # A model without a version is not an application name.
        error = _failure(lambda: client.infer(MODEL, [_input(values)]))
        assert error.status() == "StatusCode.NOT_FOUND", error
        # The names come from the field extraction's metadata, as lists (docs/architecture.md).
        assert f'named ["{MODEL}"] (model_name; model_version [])' in (error.message() or ""), error
        error = _failure(lambda: client.infer(MODEL, [_input(values)], model_version="7"))
        assert error.status() == "StatusCode.NOT_FOUND", error
        assert f'named ["{MODEL}"] (model_name; model_version ["7"])' in (error.message() or ""), error


def test_header_still_routes_and_wins(stack: Stack) -> None:
    values = np.array([4.0], dtype=np.float32)
    with stack.client() as client:
        result = client.infer(APP, [_input(values)], headers={"x-hydro-model": APP})
        np.testing.assert_array_equal(result.as_numpy("y"), values)
        # The header names no application: NOT_FOUND, even though the request's model_name is one.
        error = _failure(lambda: client.infer(APP, [_input(values)], headers={"x-hydro-model": "elsewhere"}))
        assert error.status() == "StatusCode.NOT_FOUND", error
        assert "elsewhere" in (error.message() or ""), error


def test_rest_routes_are_unchanged(stack: Stack) -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0]}]}
    for path in (f"/v2/models/{APP}/infer", f"/v2/models/{MODEL}/versions/1/infer"):
        response = httpx.post(f"http://{stack.address}{path}", json=body, timeout=10)
        assert response.status_code == 200, response.text
        assert response.json()["outputs"][0]["data"] == [1.0, 2.0]
    response = httpx.post(f"http://{stack.address}/v2/models/nope/infer", json=body, timeout=10)
    assert response.status_code == 404
    assert response.json() == {
        "error": "no application or deployed model version matches /v2/models/nope/infer; "
        "the manager's GET /api/v1/applications lists them"
    }


def test_deployment_request_limit_applies_without_headers(stack: Stack) -> None:
    values = np.zeros(2**19, dtype=np.float32)  # 2 MiB
    try:
        stack.deploy(Policies(max_request_bytes=2**20))
        with stack.client() as client:
            for headers in ({}, {"x-hydro-model": APP}):
                error = _failure(
                    lambda headers=headers: client.infer(APP, [_input(values)], headers=headers, client_timeout=30)
                )
                assert error.status() == "StatusCode.RESOURCE_EXHAUSTED", (headers, error)
                assert "policies.max_request_bytes" in (error.message() or ""), (headers, error)
            small = np.ones(16, dtype=np.float32)
            np.testing.assert_array_equal(client.infer(APP, [_input(small)]).as_numpy("y"), small)
    finally:
        stack.deploy(Policies())


def test_256_mib_tensor_round_trip(stack: Stack) -> None:
    values = np.arange(64 * 2**20, dtype=np.float32)  # 256 MiB
    with stack.client() as client:
        result = client.infer(APP, [_input(values)], client_timeout=60)
        output = result.as_numpy("y")
        assert output is not None and output.shape == values.shape
        assert np.array_equal(output, values)


def test_request_over_the_limit_is_resource_exhausted(stack: Stack) -> None:
    values = np.zeros((LIMIT_MB + 4) * 2**18, dtype=np.float32)  # 4 MiB past the limit
    with stack.client() as client:
        error = _failure(lambda: client.infer(APP, [_input(values)], client_timeout=60))
        assert error.status() == "StatusCode.RESOURCE_EXHAUSTED", error
        assert error.message() == (
            "request body too large: the model version's policies.max_request_bytes or the mesh's limit "
            "(xds_control --max-request-mb) is exceeded"
        ), error
        # The ingress is fine afterwards.
        assert client.is_model_ready(APP)
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
    response = httpx.post(f"http://{stack.address}/v2/models/{APP}/infer", json=body, timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == [1.0], "the echo model's answer"


# --- translation only (no processes) -------------------------------------------------------------------------


def test_descriptor_set_covers_every_method_that_names_a_model() -> None:
    assert model_methods(INFERENCE_DESCRIPTOR_SET.read_bytes()) == MODEL_METHODS


def test_ingress_routes_by_header_then_by_name_then_not_found() -> None:
    deployment = Deployment(model="m", version=1, replicas=1)
    app = Application(name="a", stages=[Stage(variants=[Variant(model="m", version=1, weight=100)])])
    topology = Topology(revision=1, deployments={("m", 1): deployment}, applications={"a": app})
    node = NodeInfo(node_id="ingress", role="ingress", metadata={"listen_port": 8080})
    snapshot = ingress_snapshot(topology, node, max_request_bytes=300 * 2**20)
    routes = _route_config(snapshot)
    assert [route.name for route in routes.virtual_hosts[0].routes] == [
        *("live", "ready", "server|ServerLive", "server|ServerReady", "server|ServerMetadata"),
        *("server|/v2", "server|/v2/models/stats", "server|ModelStatistics"),
        *("model|m|1", "model|m|1|grpc-model_name", "model|m|1|grpc-name", "no-deployed-version"),
        *("app|a|grpc", "app|a|grpc-model_name", "app|a|grpc-name", "app|a|rest"),
        *("no-grpc-route-by-header", "no-grpc-route", "no-route"),
    ]
    by_name = {route.name: route for route in routes.virtual_hosts[0].routes}
    # An application has no versions: a versioned REST path that no deployed version took is the ingress's
    # 404, and a header-less call naming a version never takes the application's route.
    assert by_name["no-deployed-version"].direct_response.status == 404
    version_matcher = by_name["app|a|grpc-model_name"].match.dynamic_metadata[1]
    assert (version_matcher.path[0].key, version_matcher.invert) == ("model_version", True)
    assert set(snapshot.by_type[CLUSTER]) == {"model|m|1", ANY_INSTANCE_CLUSTER}
    # Without deployments there is nobody to answer server-level calls: no aggregate cluster.
    bare = ingress_snapshot(Topology(revision=2, applications={"a": app}), node)
    assert set(bare.by_type[CLUSTER]) == {"model|m|1"}
    server_live = _route_config(bare).virtual_hosts[0].routes[2]
    assert server_live.direct_response.status == 503


def _route_config(snapshot: Snapshot) -> route_pb2.RouteConfiguration:
    packed = any_pb2.Any.FromString(snapshot.by_type[ROUTE][INGRESS_ROUTES])
    config = route_pb2.RouteConfiguration()
    assert packed.Unpack(config)
    return config
