"""A small traced mesh on free loopback ports: xds_control (told where the collector is), the ingress Envoy, and
one replica (runtime + sidecar, started by the deployer's Replica) of the controllable test model, served as
application ``ctl``. The deployment retries 5xx twice, so a replica told to fail half its calls shows retries.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import threading
from collections.abc import Coroutine, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aetcd
import httpx

from manager_api.deployer.registration import LeasedInstanceRegistry
from manager_api.deployer.replica import Replica, ReplicaConfig
from manager_api.processes import ChildProcess, free_port, wait_until
from protos.topology import (
    Application,
    Artifact,
    Deployment,
    Keys,
    ModelVersion,
    Policies,
    Signature,
    Stage,
    TensorSpec,
    Variant,
)
from xds_control.bootstrap import envoy_ready, ingress_envoy

T = TypeVar("T")
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
    listen_port: int
    admin_port: int
    model_dir: Path
    replica: Replica
    xds: ChildProcess

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    def set_mode(self, mode: str) -> None:
        """How the replica's model behaves from its next call on (ok, fail, fail-half, slow:<ms>)."""
        (self.model_dir / "mode").write_text(mode)

    def rest(self, x: float = 1.0, rows: int = 1, headers: Mapping[str, str] | None = None) -> httpx.Response:
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 1], "data": [x] * rows}]}
        return httpx.post(f"{self.url}{APP_REST}", json=body, headers=headers, timeout=10)

    def runtime_log(self) -> str:
        assert self.replica.runtime is not None and self.replica.runtime.log_path is not None
        return self.replica.runtime.log_path.read_text(errors="replace")


def _run(loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run_coroutine_threadsafe(coroutine, loop).result(90)


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
    host, _, port = etcd_endpoint.rpartition(":")
    keys = Keys(f"/hydro-tracing-{os.urandom(4).hex()}/")
    xds_port, listen_port, admin_port = free_port(), free_port(), free_port()
    argv = [sys.executable, "-m", "xds_control", "--etcd", etcd_endpoint, "--prefix", keys.prefix]
    argv += ["--port", str(xds_port), "--trace-sampling-percent", str(sampling_percent)]
    if otlp_endpoint is not None:
        argv += ["--otlp-endpoint", otlp_endpoint]
    # Only what the caller asks for: the test process's own OTEL_* variables must not leak into the stack.
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    xds = ChildProcess("xds_control", argv, env=clean_env, log_path=work / "xds.log")
    ingress = ingress_envoy(work, admin_port=admin_port, xds_port=xds_port, listen_port=listen_port)
    model_dir = work / "model"
    shutil.copytree(MODEL_FOLDER, model_dir, ignore=shutil.ignore_patterns("__pycache__"))
    # The registry's lease keep-alive must run while the caller blocks on HTTP calls: the loop gets a thread.
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, name="tracing-stack-loop", daemon=True)
    loop_thread.start()
    client = aetcd.Client(host=host, port=int(port))
    registry = LeasedInstanceRegistry(client, keys, node="tracing")
    config = ReplicaConfig(
        model=MODEL,
        version=VERSION,
        model_dir=model_dir,
        node="tracing",
        xds_host="127.0.0.1",
        xds_port=xds_port,
        workdir=work / "replica",
        drain_seconds=0,
    )
    replica = Replica(config, registry)
    saved_env = dict(os.environ)
    try:
        xds.start()
        ingress.start()
        _run(loop, client.connect())
        artifact = Artifact(digest="sha256:" + "0" * 64, uri="file:///nowhere", size=0)
        records = {
            keys.model_version(MODEL, VERSION): ModelVersion(
                name=MODEL, version=VERSION, runtime="python", artifact=artifact, signature=SIGNATURE
            ),
            keys.application(MODEL): Application(
                name=MODEL, stages=[Stage(variants=[Variant(model=MODEL, version=VERSION, weight=100)])]
            ),
            keys.deployment(MODEL, VERSION): Deployment(model=MODEL, version=VERSION, replicas=1, policies=RETRIES),
        }
        for key, record in records.items():
            _run(loop, client.put(key.encode(), record.model_dump_json().encode()))
        _run(loop, registry.start())
        ingress.wait_ready(lambda: envoy_ready(admin_port), 30)
        # The Replica starts its runtime with this process's environment.
        os.environ.clear()
        os.environ.update({**clean_env, **(runtime_env or {})})
        try:
            _run(loop, replica.start())
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
        stack = TracedStack(listen_port, admin_port, model_dir, replica, xds)
        wait_until(lambda: stack.rest().status_code == 200, 30, "the application to answer through the ingress")
        yield stack
    finally:
        for step in (replica.stop(drain=False), registry.stop(), client.close()):
            try:
                _run(loop, step)
            except Exception as exc:
                print(f"teardown step failed: {exc!r}")
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(10)
        loop.close()
        ingress.stop()
        xds.stop()
        print(xds.log_tail(20))
