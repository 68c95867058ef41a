"""`hydro up --demo`: push the iris examples, deploy them, route applications to them, show how to call them.

Two applications: ``iris`` (one scikit-learn model, two replicas) and ``iris-pipeline`` (examples/iris-pipeline:
python features -> scikit-learn classifier -> ONNX network, served by a pipeline runtime).
"""

from __future__ import annotations

import json
import runpy
from collections.abc import Callable
from pathlib import Path

import httpx

from manager_api.client import ApiError, ManagerClient
from manager_api.processes import wait_until

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEMO_APP = "iris"
DEMO_MODEL = "iris"
#: One setosa and one virginica flower from the iris data set: the answer is [0, 2].
DEMO_ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
DEMO_LABELS = [0, 2]
PIPELINE_APP = "iris-pipeline"
#: The pipeline's model names by stage folder under examples/iris-pipeline, in stage order.
PIPELINE_MODELS = {"features": "iris-features", "classifier": "iris-classifier", "scorer": "iris-scorer"}


def demo_request() -> dict[str, object]:
    """The Open Inference Protocol JSON body of the demo request."""
    return {"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP64", "data": DEMO_ROWS}]}


def pipeline_request() -> dict[str, object]:
    """The body of the pipeline demo request: the same two flowers, as the pipeline's ``measurements``."""
    return {"inputs": [{"name": "measurements", "shape": [2, 4], "datatype": "FP64", "data": DEMO_ROWS}]}


def ensure_trained(folder: Path, progress: Callable[[str], None] = lambda line: None) -> None:
    """Train the example model if its file is missing (it is built here, never downloaded)."""
    if not (folder / "model.joblib").exists():
        progress("  training the iris classifier (first run only)...")
        train = runpy.run_path(str(folder / "train.py"))["train"]
        train(folder)


def ensure_pipeline_trained(folder: Path, progress: Callable[[str], None] = lambda line: None) -> None:
    """Train the three models of the pipeline example if any of their files is missing."""
    module = runpy.run_path(str(folder / "train_pipeline.py"))
    if not module["is_trained"](folder):
        progress("  training the pipeline's three models (first run only)...")
        module["train"](folder)


def _latest_or_push(api: ManagerClient, model: str, folder: Path, progress: Callable[[str], None]) -> int:
    """The model's newest version, pushing ``folder`` as version 1 when the model is not registered yet."""
    try:
        versions = api.get_model(model).get("versions", [])
    except ApiError as exc:
        if exc.status != 404:
            raise
        versions = []
    if versions:
        newest = max(int(v["version"]) for v in versions)
        progress(f"  {model}: version {newest} is registered already")
        return newest
    pushed = api.push_model(model, folder)
    progress(f"  {model}: pushed as version {pushed['version']} ({pushed['runtime']})")
    return int(pushed["version"])


def _answer(
    ingress_url: str, app: str, body: dict[str, object], output: str, timeout: float, progress: Callable[[str], None]
) -> list[int]:
    """Poll the application through the ingress until it answers 200; return ``output`` of that answer."""
    progress(f"  waiting for {app!r} to answer through the ingress (its replicas are starting)...")
    found: list[int] = []

    def answers() -> bool:
        response = httpx.post(f"{ingress_url}/v2/models/{app}/infer", json=body, timeout=5.0)
        if response.status_code != 200:
            return False
        outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
        found[:] = [int(x) for x in outputs[output]]
        return True

    wait_until(answers, timeout, f"the demo application {app!r}", interval=0.25)
    return found


def push_demo(
    api_url: str,
    ingress_url: str,
    token: str | None = None,
    replicas: int = 2,
    timeout: float = 180.0,
    progress: Callable[[str], None] = lambda line: None,
) -> dict[str, list[int]]:
    """Register (once), deploy and route both demo applications, telling ``progress`` each step as it starts.

    Returns what each answered through the ingress: ``{"iris": labels, "iris-pipeline": species}``.
    """
    folder = EXAMPLES / "iris"
    pipeline_folder = EXAMPLES / "iris-pipeline"
    ensure_trained(folder, progress)
    ensure_pipeline_trained(pipeline_folder, progress)
    with ManagerClient(api_url, token) as api:
        version = _latest_or_push(api, DEMO_MODEL, folder, progress)
        api.deploy(DEMO_MODEL, version, replicas)
        api.put_application(DEMO_APP, [(DEMO_MODEL, version, 100)])
        progress(f"  {DEMO_MODEL}: version {version} deployed with {replicas} replicas, application {DEMO_APP!r}")
        stages: list[dict[str, object]] = []
        for stage, model in PIPELINE_MODELS.items():
            stage_version = _latest_or_push(api, model, pipeline_folder / stage, progress)
            api.deploy(model, stage_version, 1)
            stages.append({"variants": [{"model": model, "version": stage_version, "weight": 100}]})
        api.put_application_stages(PIPELINE_APP, stages)
        progress(f"  application {PIPELINE_APP!r}: {len(stages)} stages deployed, its pipeline runtime starting")
    return {
        DEMO_APP: _answer(ingress_url, DEMO_APP, demo_request(), "label", timeout, progress),
        PIPELINE_APP: _answer(ingress_url, PIPELINE_APP, pipeline_request(), "species", timeout, progress),
    }


def usage(ingress_url: str) -> str:
    """The curl lines and tritonclient snippet printed by `hydro up --demo`."""
    body = json.dumps(demo_request(), separators=(",", ":"))
    pipeline_body = json.dumps(pipeline_request(), separators=(",", ":"))
    host = ingress_url.removeprefix("http://")
    return f"""Try it (expect label [0, 2]):

  curl -s -X POST {ingress_url}/v2/models/{DEMO_APP}/infer -H 'content-type: application/json' -d '{body}'

The three-stage pipeline (python features -> scikit-learn -> ONNX network; expect species [0, 2], and the
header x-hydro-stages naming the model version of each stage):

  curl -si -X POST {ingress_url}/v2/models/{PIPELINE_APP}/infer -H 'content-type: application/json' -d '{pipeline_body}'

or with tritonclient over gRPC (the model name in the request picks the application):

  import numpy as np, tritonclient.grpc as grpcclient
  client = grpcclient.InferenceServerClient("{host}")
  x = grpcclient.InferInput("input", [2, 4], "FP64")
  x.set_data_from_numpy(np.array({DEMO_ROWS}))
  result = client.infer("{DEMO_APP}", [x])
  print(result.as_numpy("label"))
"""
