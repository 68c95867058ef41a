"""Stock Triton clients through the ingress, no extra headers: what a KServe/Triton user does on day one.

tritonclient.http and tritonclient.grpc, sync and asyncio, against application `iris` served by `hydro up`:
server and model metadata, readiness, inference with binary and JSON data, requested outputs, an unknown
model and a wrong datatype (both clear errors, not hangs).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpclient_aio
from hydro_mesh import EXPECTED, ROWS, Mesh
from tritonclient.utils import InferenceServerException

from manager_api.processes import wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def iris(mesh: Mesh, model_dir: Path) -> Mesh:
    version = mesh.api.push_model("iris", model_dir)["version"]
    mesh.api.deploy("iris", version, replicas=1)
    mesh.api.put_application("iris", [("iris", version, 100)])
    wait_until(lambda: mesh.infer().status_code == 200, 120, "iris through the ingress")
    return mesh


def _http_inputs(binary: bool) -> list[httpclient.InferInput]:
    tensor = httpclient.InferInput("input", list(ROWS.shape), "FP64")
    tensor.set_data_from_numpy(np.asarray(ROWS), binary_data=binary)
    return [tensor]


def _grpc_inputs(datatype: str = "FP64") -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("input", list(ROWS.shape), datatype)
    data = np.asarray(ROWS, dtype=np.float64 if datatype == "FP64" else np.float32)
    tensor.set_data_from_numpy(data)
    return [tensor]


def test_http_client(iris: Mesh) -> None:
    client = httpclient.InferenceServerClient(iris.grpc_target)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("iris")
        metadata = client.get_model_metadata("iris")
        assert [i["name"] for i in metadata["inputs"]] == ["input"]
        for binary in (True, False):
            result = client.infer("iris", _http_inputs(binary))
            assert result.as_numpy("label").tolist() == EXPECTED
        only_label = client.infer("iris", _http_inputs(True), outputs=[httpclient.InferRequestedOutput("label")])
        assert only_label.as_numpy("probabilities") is None and only_label.as_numpy("label").tolist() == EXPECTED
        with pytest.raises(InferenceServerException) as unknown:
            client.infer("no-such-app", _http_inputs(True))
        assert unknown.value.status() == "404", unknown.value
        expected = "no application or deployed model version matches /v2/models/no-such-app/infer"
        assert expected in unknown.value.message(), unknown.value
    finally:
        client.close()


def test_grpc_client_without_headers(iris: Mesh) -> None:
    client = grpcclient.InferenceServerClient(iris.grpc_target)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("iris")
        assert [i.name for i in client.get_model_metadata("iris").inputs] == ["input"]
        result = client.infer("iris", _grpc_inputs())
        assert result.as_numpy("label").tolist() == EXPECTED
        requested = client.infer("iris", _grpc_inputs(), outputs=[grpcclient.InferRequestedOutput("probabilities")])
        assert requested.as_numpy("label") is None and requested.as_numpy("probabilities").shape == (4, 3)
        with pytest.raises(InferenceServerException) as unknown:
            client.infer("no-such-app", _grpc_inputs(), client_timeout=10)
        assert "NOT_FOUND" in str(unknown.value.status()) and "no-such-app" in str(unknown.value)
        with pytest.raises(InferenceServerException) as wrong:
            client.infer("iris", _grpc_inputs("FP32"), client_timeout=10)
        assert "INVALID_ARGUMENT" in str(wrong.value.status()) and "input" in str(wrong.value)
    finally:
        client.close()


def test_asyncio_clients(iris: Mesh) -> None:
    async def run() -> tuple[list[int], list[int]]:
        grpc_client = grpcclient_aio.InferenceServerClient(iris.grpc_target)
        http_client = httpclient_aio.InferenceServerClient(iris.grpc_target)
        try:
            grpc_result, http_result = await asyncio.gather(
                grpc_client.infer("iris", _grpc_inputs()), http_client.infer("iris", _http_inputs(True))
            )
            return grpc_result.as_numpy("label").tolist(), http_result.as_numpy("label").tolist()
        finally:
            await grpc_client.close()
            await http_client.close()

    assert asyncio.run(run()) == (EXPECTED, EXPECTED)
