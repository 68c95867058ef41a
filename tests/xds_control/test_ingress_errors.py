"""What the ingress answers itself through a real Envoy: a model version that is not deployed, addressed through an
application's name, and a model version or pipeline with no ready replica. REST with httpx, gRPC with
tritonclient.grpc (header-less, and with the x-hydro-model header).

One stack for the module: etcd, xds_control, the ingress Envoy, and one replica of model ``iris`` version 1 (a
python model that returns its input). ``iris`` version 2 is registered, not deployed. Application ``iris`` (the
model's own name) and application ``shop`` route to iris:1. Model ``ghost`` version 1 is deployed with no
replica, application ``haunt`` routes to it, and ``chain`` is a two-stage application whose pipeline has no
replica (no deployer runs here).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from framework_models import python_identity
from ingress_stack import IngressStack, ingress_stack
from pydantic import BaseModel
from tritonclient.utils import InferenceServerException

from manager_api.etcd_server import EtcdServer
from manager_api.processes import wait_until
from protos.topology.applications import Application, Stage, Variant
from protos.topology.deployments import Deployment
from protos.topology.models import Artifact, ModelVersion, Signature, TensorSpec

SIGNATURE = Signature(
    inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1])],
    outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1])],
)
BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
#: The header every answer that came through a sidecar carries: an answer without it is the ingress's own.
SERVED_BY = "x-hydro-served-by"


def _version(model: str, version: int) -> ModelVersion:
    artifact = Artifact(digest="sha256:" + "0" * 64, uri="file:///nowhere", size=0)
    return ModelVersion(name=model, version=version, runtime="python", artifact=artifact, signature=SIGNATURE)


def _app(name: str, *stages: tuple[str, int]) -> Application:
    return Application(name=name, stages=[Stage(variants=[Variant(model=m, version=v, weight=100)]) for m, v in stages])


@pytest.fixture(scope="module")
def mesh(etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[IngressStack]:
    work = tmp_path_factory.mktemp("ingress-errors")
    model_dir = python_identity(work / "model")
    with ingress_stack(etcd_server.endpoint, work) as stack:
        keys = stack.keys
        records: dict[str, BaseModel] = {
            keys.model_version("iris", 1): _version("iris", 1),
            keys.model_version("iris", 2): _version("iris", 2),
            keys.deployment("iris", 1): Deployment(model="iris", version=1, replicas=1),
            keys.application("iris"): _app("iris", ("iris", 1)),
            keys.application("shop"): _app("shop", ("iris", 1)),
            keys.model_version("ghost", 1): _version("ghost", 1),
            keys.deployment("ghost", 1): Deployment(model="ghost", version=1, replicas=1),
            keys.application("haunt"): _app("haunt", ("ghost", 1)),
            keys.application("chain"): _app("chain", ("iris", 1), ("iris", 1)),
        }
        stack.put(records)
        stack.start_replicas("iris", 1, [model_dir])
        wait_until(lambda: _rest(stack, "/v2/models/shop/infer").status_code == 200, 30, "shop through the ingress")
        wait_until(lambda: _rest(stack, "/v2/models/chain/infer").status_code == 503, 30, "chain's route")
        yield stack


def _rest(mesh: IngressStack, path: str, body: dict[str, Any] | None = BODY) -> httpx.Response:
    if body is None:
        return httpx.get(f"{mesh.url}{path}", timeout=10)
    return httpx.post(f"{mesh.url}{path}", json=body, timeout=10)


def _client(mesh: IngressStack) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(f"127.0.0.1:{mesh.listen_port}")


def _infer(mesh: IngressStack, model: str, version: str = "", headers: dict[str, str] | None = None) -> Any:
    tensor = triton.InferInput("x", [1], "FP32")
    tensor.set_data_from_numpy(np.array([1.0], dtype=np.float32))
    with _client(mesh) as client:
        return client.infer(model, [tensor], model_version=version, headers=headers)


def _grpc_failure(mesh: IngressStack, model: str, version: str = "", headers: dict[str, str] | None = None) -> Any:
    with pytest.raises(InferenceServerException) as caught:
        _infer(mesh, model, version, headers)
    return caught.value


def test_documented_routes_still_answer(mesh: IngressStack) -> None:
    for path in ("/v2/models/iris/infer", "/v2/models/shop/infer", "/v2/models/iris/versions/1/infer"):
        response = _rest(mesh, path)
        assert response.status_code == 200, (path, response.text)
        assert response.headers[SERVED_BY].startswith("iris:1/"), path
    for path in ("/v2/models/shop", "/v2/models/iris/ready", "/v2/models/iris/versions/1"):
        assert _rest(mesh, path, body=None).status_code == 200, path
    for model, version in (("iris", ""), ("shop", ""), ("iris", "1")):
        response = _infer(mesh, model, version).get_response()
        assert (response.model_name, response.model_version) == ("iris", "1")
    assert _infer(mesh, "shop", headers={"x-hydro-model": "shop"}).get_response().model_version == "1"


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/iris/versions/2/infer",  # registered, not deployed; application iris is iris:1
        "/v2/models/shop/versions/1/infer",  # an application has no versions, even the one its variant has
        "/v2/models/shop/versions/2/infer",
        "/v2/models/iris/versions/2",
        "/v2/models/iris/versions/2/ready",
        "/v2/models/chain/versions/1/infer",
    ],
)
def test_rest_version_that_is_not_deployed_is_the_ingress_404(mesh: IngressStack, path: str) -> None:
    response = _rest(mesh, path, body=None if "infer" not in path else BODY)
    assert response.status_code == 404, response.text
    assert SERVED_BY not in response.headers, "a runtime answered, not the ingress"
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert path in error and "no deployed model version" in error, error
    assert "runtime" not in error, error


@pytest.mark.parametrize("model, version", [("iris", "2"), ("shop", "1"), ("shop", "2"), ("chain", "1")])
def test_grpc_version_that_is_not_deployed_is_not_found(mesh: IngressStack, model: str, version: str) -> None:
    error = _grpc_failure(mesh, model, version)
    assert error.status() == "StatusCode.NOT_FOUND", error
    message = error.message() or ""
    assert message.startswith("no application or deployed model version named"), message
    assert f'["{model}"]' in message and f'["{version}"]' in message, message
    assert "runtime" not in message, message


def test_header_routed_grpc_with_a_version_is_judged_by_the_runtime(mesh: IngressStack) -> None:
    """The x-hydro-model header names an application and the ingress never reads a header-routed body (its cost is
    none): the runtime behind the application judges the version. An application has no versions, so a call
    naming one with a version is NOT_FOUND, even the version its variant has; a model that shares the
    application's name is addressed as that model."""
    for version in ("1", "2"):
        error = _grpc_failure(mesh, "shop", version, headers={"x-hydro-model": "shop"})
        assert error.status() == "StatusCode.NOT_FOUND", error
        assert error.message().startswith(f"application 'shop' has no versions (asked for version '{version}')")
    error = _grpc_failure(mesh, "iris", "2", headers={"x-hydro-model": "iris"})
    assert error.status() == "StatusCode.NOT_FOUND", error
    assert error.message() == "model 'iris' has no version '2' here (this runtime serves version 1)", error
    response = _infer(mesh, "iris", "1", headers={"x-hydro-model": "iris"}).get_response()
    assert (response.model_name, response.model_version) == ("iris", "1")


def test_no_ready_replica_names_the_model_version(mesh: IngressStack) -> None:
    expected = "no healthy upstream: no ready replica of model version ghost:1 (hydro status shows why)"
    for path in ("/v2/models/haunt/infer", "/v2/models/ghost/versions/1/infer"):
        response = _rest(mesh, path)
        assert response.status_code == 503, response.text
        assert response.json() == {"error": expected}
    by_header = {"x-hydro-model": "haunt"}
    for model, version, headers in (("haunt", "", None), ("ghost", "1", None), ("haunt", "", by_header)):
        error = _grpc_failure(mesh, model, version, headers)
        assert error.status() == "StatusCode.UNAVAILABLE", error
        assert error.message() == expected


def test_no_ready_pipeline_names_the_application(mesh: IngressStack) -> None:
    expected = "no healthy upstream: no ready replica of application chain's pipeline (hydro status shows why)"
    response = _rest(mesh, "/v2/models/chain/infer")
    assert response.status_code == 503, response.text
    assert response.json() == {"error": expected}
    error = _grpc_failure(mesh, "chain")
    assert error.status() == "StatusCode.UNAVAILABLE", error
    assert error.message() == expected
