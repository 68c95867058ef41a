"""`hydro up --demo` from nothing: both demo applications answer, and the curl lines it prints work as printed."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import httpx
import pytest
from hydro_mesh import running_mesh

from manager_api.processes import wait_until

pytestmark = pytest.mark.e2e

READY = "Press Ctrl-C to stop everything."


def _printed_curls(log: str) -> dict[str, tuple[str, dict[str, object]]]:
    """The demo's curl lines, by application: (URL, JSON body)."""
    curls: dict[str, tuple[str, dict[str, object]]] = {}
    for line in log.splitlines():
        if not line.strip().startswith("curl "):
            continue
        words = shlex.split(line)
        url = next(word for word in words if word.startswith("http://"))
        app = re.fullmatch(r"http://[^/]+/v2/models/([^/]+)/infer", url)
        assert app is not None, url
        curls[app.group(1)] = (url, json.loads(words[words.index("-d") + 1]))
    return curls


def test_demo_deploys_iris_and_the_three_stage_pipeline(tmp_path: Path) -> None:
    with running_mesh(tmp_path / "hydro", extra_args=["--demo"]) as mesh:
        log = mesh.data_dir / "hydro-up.log"
        wait_until(lambda: READY in log.read_text(), 300, "the demo pushed and answering")
        text = log.read_text()
        # Each step says what it does while the demo starts (the replicas take seconds), in order.
        steps = [
            "iris: pushed as version 1 (sklearn)",
            "iris: version 1 deployed with 2 replicas, application 'iris'",
            "iris-scorer: pushed as version 1 (onnx)",
            "application 'iris-pipeline': 3 stages deployed, its pipeline runtime starting",
            "waiting for 'iris' to answer through the ingress",
            "waiting for 'iris-pipeline' to answer through the ingress",
            "The demo application 'iris' answered",
        ]
        places = [text.find(step) for step in steps]
        assert -1 not in places and places == sorted(places), dict(zip(steps, places, strict=True))
        assert "The demo application 'iris' answered through the ingress: label [0, 2]" in text
        assert "The demo application 'iris-pipeline' answered: species [0, 2]" in text
        # The demo's and the readiness polls' requests are not each a log line (httpx logs them at INFO), neither
        # in what `hydro up` prints nor in the manager's log, where the deployer polls every starting replica.
        assert "HTTP Request:" not in text
        manager_log = (mesh.data_dir / "logs" / "manager_api.log").read_text()
        assert "HTTP Request:" not in manager_log, manager_log[-2000:]

        curls = _printed_curls(text)
        assert set(curls) == {"iris", "iris-pipeline"}
        url, body = curls["iris"]
        response = httpx.post(url, json=body, timeout=30)
        assert response.status_code == 200, response.text
        assert {o["name"]: o["data"] for o in response.json()["outputs"]}["label"] == [0, 2]

        url, body = curls["iris-pipeline"]
        response = httpx.post(url, json=body, timeout=30)
        assert response.status_code == 200, response.text
        assert {o["name"]: o["data"] for o in response.json()["outputs"]}["species"] == [0, 2]
        stages = response.headers["x-hydro-stages"]
        assert stages == "1=iris-features:1;2=iris-classifier:1;3=iris-scorer:1", stages
        assert mesh.api.get_model_version("iris-scorer", 1)["runtime"] == "onnx"
