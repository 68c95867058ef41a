"""Registration checks the declared signature against the model itself (a real manager process, no deployer).

A mismatch is a 400 naming the field; a model that does not load is a 400 saying why; neither leaves a version
in etcd. The check loads the model in a child process, so the manager keeps answering meanwhile.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from framework_models import (
    lightgbm_classifier,
    onnx_classifier,
    onnx_linear,
    sklearn_classifier,
    xgboost_classifier,
)

from manager_api.client import pack_model_folder
from manager_api.etcd_server import EtcdServer
from manager_api.ports import free_port
from manager_api.processes import ChildProcess, http_ok


@pytest.fixture(scope="module")
def manager(etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    data_dir = tmp_path_factory.mktemp("manager")
    port = free_port()
    argv = [sys.executable, "-m", "manager_api", "--etcd", etcd_server.endpoint, "--prefix", "/hydro-signatures/"]
    argv += ["--data-dir", str(data_dir), "--port", str(port)]
    process = ChildProcess("manager_api", argv, log_path=data_dir / "manager.log").start()
    try:
        url = f"http://127.0.0.1:{port}"
        process.wait_ready(lambda: http_ok(f"{url}/healthz"), 60)
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client
    finally:
        process.stop()


def _register(manager: httpx.Client, name: str, folder: Path) -> httpx.Response:
    files = {"archive": ("m.tar.gz", pack_model_folder(folder))}
    return manager.post(f"/api/v1/models/{name}/versions", files=files)


def _declare(folder: Path, old: str, new: str) -> Path:
    yaml = (folder / "serving.yaml").read_text()
    assert old in yaml
    (folder / "serving.yaml").write_text(yaml.replace(old, new))
    return folder


def _refused(manager: httpx.Client, name: str, folder: Path) -> str:
    response = _register(manager, name, folder)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    assert manager.get(f"/api/v1/models/{name}").status_code == 404, "a refused upload registers nothing"
    return str(response.json()["error"])


def test_matching_onnx_model_is_registered(manager: httpx.Client, tmp_path: Path) -> None:
    response = _register(manager, "onnx-ok", onnx_classifier(tmp_path / "m"))
    assert response.status_code == 201, response.text
    assert response.json()["runtime"] == "onnx"
    assert response.json()["signature"]["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]


def test_onnx_shape_mismatch_names_the_field(manager: httpx.Client, tmp_path: Path) -> None:
    error = _refused(manager, "onnx-shape", onnx_linear(tmp_path / "m", features=3))
    assert error == "signature.inputs[0].shape: the ONNX graph says [-1, 4], serving.yaml says [-1, 3]"


def test_onnx_datatype_and_output_mismatch(manager: httpx.Client, tmp_path: Path) -> None:
    folder = _declare(onnx_classifier(tmp_path / "m"), "{name: label, datatype: INT64", "{name: label, datatype: INT32")
    folder = _declare(folder, "probabilities", "scores")
    error = _refused(manager, "onnx-types", folder)
    assert "signature.outputs[0].datatype: the ONNX graph says INT64, serving.yaml says INT32" in error
    assert "signature.outputs[1].name: the ONNX graph has no output 'scores'" in error


@pytest.mark.parametrize(
    ("build", "source"),
    [
        (xgboost_classifier, "the XGBoost model"),
        (lightgbm_classifier, "the LightGBM model"),
        (sklearn_classifier, "the scikit-learn model"),
    ],
)
def test_tabular_feature_count_mismatch(
    manager: httpx.Client, tmp_path: Path, build: Callable[[Path], Path], source: str
) -> None:
    folder = _declare(build(tmp_path / "m"), "[-1, 4]", "[-1, 6]")
    error = _refused(manager, "tabular", folder)
    assert error == f"signature.inputs[0].shape: {source} says [-1, 4], serving.yaml says [-1, 6]"


def test_class_count_mismatch(manager: httpx.Client, tmp_path: Path) -> None:
    folder = _declare(lightgbm_classifier(tmp_path / "m"), "[-1, 3]", "[-1, 2]")
    error = _refused(manager, "classes", folder)
    assert error == "signature.outputs[1].shape: the LightGBM model says [-1, 3], serving.yaml says [-1, 2]"


def test_model_that_does_not_load(manager: httpx.Client, tmp_path: Path) -> None:
    folder = onnx_classifier(tmp_path / "m")
    (folder / "iris.onnx").write_bytes(b"\x00not a graph")
    error = _refused(manager, "corrupt", folder)
    assert error.startswith("the onnx model does not load: cannot load iris.onnx with onnxruntime"), error


def test_manager_answers_while_a_model_is_checked(manager: httpx.Client, tmp_path: Path) -> None:
    folder = xgboost_classifier(tmp_path / "m")
    done = threading.Event()
    result: list[httpx.Response] = []

    def register() -> None:
        with httpx.Client(base_url=str(manager.base_url), timeout=60) as client:
            result.append(_register(client, "busy", folder))
        done.set()

    thread = threading.Thread(target=register)
    thread.start()
    slowest = 0.0
    answered = 0
    # The check takes seconds (a child process importing XGBoost); other requests are served meanwhile.
    while not done.is_set():
        started = time.monotonic()
        assert manager.get("/api/v1/models").status_code == 200
        slowest = max(slowest, time.monotonic() - started)
        answered += 1
        done.wait(0.05)
    thread.join()
    assert result[0].status_code == 201, result[0].text
    assert answered >= 3 and slowest < 1.0, (answered, slowest)
