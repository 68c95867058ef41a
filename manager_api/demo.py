"""`hydro up --demo`: push the iris example, deploy it, route an application to it, show how to call it."""

from __future__ import annotations

import json
import runpy
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


def demo_request() -> dict[str, object]:
    """The Open Inference Protocol JSON body of the demo request."""
    return {"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP64", "data": DEMO_ROWS}]}


def ensure_trained(folder: Path) -> None:
    """Train the example model if its file is missing (it is built here, never downloaded)."""
    if not (folder / "model.joblib").exists():
        train = runpy.run_path(str(folder / "train.py"))["train"]
        train(folder)


def push_demo(
    api_url: str, ingress_url: str, token: str | None = None, replicas: int = 2, timeout: float = 120.0
) -> list[int]:
    """Register (once), deploy and route the iris example; return the labels it answered through the ingress."""
    folder = EXAMPLES / "iris"
    ensure_trained(folder)
    with ManagerClient(api_url, token) as api:
        try:
            versions = api.get_model(DEMO_MODEL).get("versions", [])
        except ApiError as exc:
            if exc.status != 404:
                raise
            versions = []
        if versions:
            version = max(int(v["version"]) for v in versions)
        else:
            version = int(api.push_model(DEMO_MODEL, folder)["version"])
        api.deploy(DEMO_MODEL, version, replicas)
        api.put_application(DEMO_APP, [(DEMO_MODEL, version, 100)])

    labels: list[int] = []

    def answers() -> bool:
        response = httpx.post(f"{ingress_url}/v2/models/{DEMO_APP}/infer", json=demo_request(), timeout=5.0)
        if response.status_code != 200:
            return False
        outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
        labels[:] = [int(x) for x in outputs["label"]]
        return True

    wait_until(answers, timeout, "the demo application", interval=0.25)
    return labels


def usage(ingress_url: str) -> str:
    """The curl line and tritonclient snippet printed by `hydro up --demo`."""
    body = json.dumps(demo_request(), separators=(",", ":"))
    host = ingress_url.removeprefix("http://")
    return f"""Try it (expect label [0, 2]):

  curl -s -X POST {ingress_url}/v2/models/{DEMO_APP}/infer -H 'content-type: application/json' -d '{body}'

or with tritonclient over gRPC (the model name in the request picks the application):

  import numpy as np, tritonclient.grpc as grpcclient
  client = grpcclient.InferenceServerClient("{host}")
  x = grpcclient.InferInput("input", [2, 4], "FP64")
  x.set_data_from_numpy(np.array({DEMO_ROWS}))
  result = client.infer("{DEMO_APP}", [x])
  print(result.as_numpy("label"))
"""
