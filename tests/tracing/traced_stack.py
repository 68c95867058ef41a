"""A small traced mesh on free loopback ports: xds_control (told where the collector is), the ingress Envoy, and
one replica (runtime + sidecar, started by the deployer's Replica) of the controllable test model, served as
application ``ctl``. The deployment retries 5xx twice, so a replica told to fail half its calls shows retries.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from ingress_stack import IngressStack, ingress_stack

from manager_api.deployer.replica import Replica
from manager_api.processes import wait_until
from protos.topology.deployments import Deployment
from protos.topology.models import Signature, TensorSpec
from protos.topology.policies import Policies

MODEL_FOLDER = Path(__file__).resolve().parents[1] / "xds_control" / "controllable_model"
MODEL = "ctl"
VERSION = 1
APP_REST = f"/v2/models/{MODEL}/infer"
SIGNATURE = Signature(
    inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 1])],
    outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1, 1])],
)
RETRIES = Policies.model_validate({"retries": {"attempts": 2, "retry_on": "5xx,internal"}})


@dataclass
class TracedStack:
    mesh: IngressStack
    model_dir: Path
    replica: Replica

    @property
    def listen_port(self) -> int:
        return self.mesh.listen_port

    @property
    def admin_port(self) -> int:
        return self.mesh.admin_port

    @property
    def url(self) -> str:
        return self.mesh.url

    def set_mode(self, mode: str) -> None:
        """How the replica's model behaves from its next call on (ok, fail, fail-half, slow:<ms>)."""
        (self.model_dir / "mode").write_text(mode)

    def rest(self, x: float = 1.0, rows: int = 1, headers: Mapping[str, str] | None = None) -> httpx.Response:
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 1], "data": [x] * rows}]}
        return httpx.post(f"{self.url}{APP_REST}", json=body, headers=headers, timeout=10)

    def runtime_log(self) -> str:
        assert self.replica.runtime is not None and self.replica.runtime.log_path is not None
        return self.replica.runtime.log_path.read_text(errors="replace")


@contextmanager
def traced_stack(
    etcd_endpoint: str,
    work: Path,
    *,
    otlp_endpoint: str | None,
    runtime_env: Mapping[str, str] | None = None,
    sampling_percent: float = 100.0,
) -> Iterator[TracedStack]:
    """The stack, ready (the application answers through the ingress); every process stopped on exit.

    ``otlp_endpoint`` (HOST:PORT) goes to xds_control; ``runtime_env`` to the runtime (OTEL_* variables).
    """
    xds_args = ["--trace-sampling-percent", str(sampling_percent)]
    if otlp_endpoint is not None:
        xds_args += ["--otlp-endpoint", otlp_endpoint]
    # Only what the caller asks for: the test process's own OTEL_* variables must not leak into the stack.
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    model_dir = work / "model"
    shutil.copytree(MODEL_FOLDER, model_dir, ignore=shutil.ignore_patterns("__pycache__"))
    with ingress_stack(etcd_endpoint, work, xds_args=xds_args, xds_env=clean_env) as mesh:
        deployment = Deployment(model=MODEL, version=VERSION, replicas=1, policies=RETRIES)
        mesh.put_model(MODEL, VERSION, SIGNATURE, app=MODEL, deployment=deployment)
        (replica,) = mesh.start_replicas(MODEL, VERSION, [model_dir], env={**clean_env, **(runtime_env or {})})
        stack = TracedStack(mesh, model_dir, replica)
        wait_until(lambda: stack.rest().status_code == 200, 30, "the application to answer through the ingress")
        yield stack
