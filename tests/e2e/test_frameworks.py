"""ONNX, XGBoost and LightGBM models through the whole mesh, in one `hydro up`.

Each model is made by the test, registered (its signature checked against the model by the manager), deployed
with one replica behind an application of its own, and asked over REST and gRPC through the ingress; the answers
must equal the framework's own predictions on the same rows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import lightgbm
import numpy as np
import onnxruntime
import pytest
import tritonclient.grpc as grpcclient
import xgboost
from framework_models import ROWS, lightgbm_classifier, onnx_classifier, xgboost_classifier
from hydro_mesh import Mesh

from manager_api.processes import wait_until

pytestmark = pytest.mark.e2e


def _onnx_answers(folder: Path) -> dict[str, np.ndarray]:
    session = onnxruntime.InferenceSession(str(folder / "iris.onnx"), providers=["CPUExecutionProvider"])
    label, probabilities = session.run(["label", "probabilities"], {"input": ROWS})
    return {"label": label, "probabilities": probabilities}


def _xgboost_answers(folder: Path) -> dict[str, np.ndarray]:
    probabilities = xgboost.Booster(model_file=str(folder / "iris.ubj")).predict(xgboost.DMatrix(ROWS))
    return {"label": np.argmax(probabilities, axis=1), "probabilities": probabilities}


def _lightgbm_answers(folder: Path) -> dict[str, np.ndarray]:
    probabilities = lightgbm.Booster(model_file=str(folder / "iris.txt")).predict(ROWS)
    return {"label": np.argmax(probabilities, axis=1), "probabilities": probabilities}


MODELS: dict[str, tuple[Callable[[Path], Path], Callable[[Path], dict[str, np.ndarray]]]] = {
    "onnx": (onnx_classifier, _onnx_answers),
    "xgboost": (xgboost_classifier, _xgboost_answers),
    "lightgbm": (lightgbm_classifier, _lightgbm_answers),
}


def _infer(mesh: Mesh, app: str) -> httpx.Response:
    body = {"inputs": [{"name": "input", "shape": list(ROWS.shape), "datatype": "FP32", "data": ROWS.tolist()}]}
    return httpx.post(f"{mesh.ingress}/v2/models/{app}/infer", json=body, timeout=10)


def _outputs(response: httpx.Response) -> dict[str, dict[str, Any]]:
    assert response.status_code == 200, response.text
    return {o["name"]: o for o in response.json()["outputs"]}


def test_framework_models_through_the_mesh(mesh: Mesh, tmp_path: Path) -> None:
    expected: dict[str, dict[str, np.ndarray]] = {}
    for kind, (build, answers) in MODELS.items():
        folder = build(tmp_path / kind)
        expected[kind] = answers(folder)
        registered = mesh.api.push_model(f"{kind}-iris", folder)
        assert registered["runtime"] == kind and registered["version"] == 1
    # All three deploy at once: their runtimes start (and import their frameworks) in parallel.
    for kind in MODELS:
        mesh.api.deploy(f"{kind}-iris", 1, replicas=1)
        mesh.api.put_application(f"{kind}-iris", [(f"{kind}-iris", 1, 100)])
    for kind in MODELS:

        def serving(app: str = f"{kind}-iris") -> bool:
            return _infer(mesh, app).status_code == 200

        wait_until(serving, 180, f"{kind} through the ingress")

    client = grpcclient.InferenceServerClient(mesh.grpc_target)
    try:
        for kind, want in expected.items():
            outputs = _outputs(_infer(mesh, f"{kind}-iris"))
            assert outputs["label"]["datatype"] == "INT64" and outputs["label"]["shape"] == [len(ROWS)]
            assert outputs["probabilities"]["shape"] == [len(ROWS), 3]
            assert outputs["label"]["data"] == want["label"].tolist() == [0, 0, 1, 1, 2, 2], kind
            np.testing.assert_allclose(
                np.reshape(outputs["probabilities"]["data"], (len(ROWS), 3)), want["probabilities"], rtol=1e-5
            )

            tensor = grpcclient.InferInput("input", list(ROWS.shape), "FP32")
            tensor.set_data_from_numpy(ROWS)
            result = client.infer(f"{kind}-iris", [tensor], headers={"x-hydro-model": f"{kind}-iris"})
            assert result.as_numpy("label").tolist() == want["label"].tolist(), kind
            np.testing.assert_allclose(result.as_numpy("probabilities"), want["probabilities"], rtol=1e-5)
            assert result.get_response().model_name == f"{kind}-iris"
    finally:
        client.close()

    # A wrong request is the runtime's 400 naming the tensor, whatever the framework.
    bad = {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1.0, 2.0, 3.0]}]}
    response = httpx.post(f"{mesh.ingress}/v2/models/lightgbm-iris/infer", json=bad, timeout=10)
    assert response.status_code == 400 and "'input'" in response.json()["error"], response.text
