"""`hydro up --otlp-endpoint` sends every process's and Envoy's spans to the collector: one request to the demo
application is one trace from the ingress through the sidecar to the runtime that the manager started."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hydro_mesh import running_mesh
from otlp_receiver import OtlpReceiver, ReceivedSpan

from manager_api.credentials import load_credentials
from manager_api.demo import DEMO_APP, push_demo


def test_hydro_up_traces_to_the_collector_it_is_given(receiver: OtlpReceiver, tmp_path: Path) -> None:
    with running_mesh(tmp_path, extra_args=["--otlp-endpoint", receiver.endpoint]) as mesh:
        credentials = load_credentials(tmp_path)
        assert credentials is not None
        push_demo(mesh.api.base_url, mesh.ingress, credentials.token, replicas=1)
        receiver.clear()
        response = mesh.infer(DEMO_APP)
        assert response.status_code == 200, response.text
        trace_id = response.headers["x-hydro-trace-id"]

        def complete(spans: list[ReceivedSpan]) -> bool:
            services = {s.service for s in spans if s.trace_id == trace_id}
            return {"ingress", "sidecar iris:1", "runtime iris:1"} <= services

        spans = [s for s in receiver.wait_for(complete, 30, "the demo request's trace") if s.trace_id == trace_id]
    (runtime,) = [s for s in spans if s.service == "runtime iris:1"]
    parent = next(s for s in spans if s.span_id == runtime.parent_id)
    assert parent.service == "sidecar iris:1"
    assert runtime.attributes["hydro.application"] == DEMO_APP


def test_hydro_up_refuses_a_bad_collector_address(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "manager_api.cli", "up", "--data-dir", str(tmp_path), "--otlp-endpoint", "ftp://x"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--otlp-endpoint" in done.stdout + done.stderr and "scheme" in done.stdout + done.stderr
