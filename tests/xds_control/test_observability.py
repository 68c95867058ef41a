"""What xds_control tells about itself, with a real ingress Envoy: proxy status in etcd (and the manager API),
Prometheus metrics, convergence time, and a NACK that is recorded, not looped on, and recovered from.

Traffic goes ingress -> a real runtime's gRPC port (no sidecar needed for this): tritonclient's messages are
used on the wire because protos.inference_pb2 cannot share a process with tritonclient's copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aetcd
import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from refusing_xds_control import REFUSED_APP
from tritonclient.grpc import service_pb2, service_pb2_grpc

from manager_api.etcd_server import EtcdServer
from manager_api.ports import free_port
from manager_api.processes import ChildProcess, http_ok, wait_until
from protos.topology.applications import Application, Stage, Variant
from protos.topology.deployments import Deployment
from protos.topology.instances import Instance
from protos.topology.keys import Keys
from protos.topology.models import Artifact, ModelVersion, Signature, TensorSpec
from protos.topology.proxies import ProxyStatus
from xds_control.bootstrap import envoy_ready, ingress_envoy

MODEL_PY = "def predict(inputs):\n    return {'y': inputs['x'] * 2}\n"
SERVING_YAML = """\
runtime: python
files: [model.py]
entrypoint: model:predict
signature:
  inputs: [{name: x, datatype: FP32, shape: [-1]}]
  outputs: [{name: y, datatype: FP32, shape: [-1]}]
"""


@dataclass
class Stack:
    etcd: EtcdServer
    keys: Keys
    ingress_port: int
    admin_port: int
    metrics_port: int
    runtime_grpc_port: int

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics").text
        found = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return found

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def etcd_call(self, work: Any) -> Any:
        async def run() -> Any:
            host, port = self.etcd.endpoint.rsplit(":", 1)
            async with aetcd.Client(host=host, port=int(port)) as client:
                return await work(client)

        return asyncio.run(run())

    def put(self, records: dict[str, str]) -> None:
        async def work(client: aetcd.Client) -> None:
            for key, value in records.items():
                await client.put(key.encode(), value.encode())

        self.etcd_call(work)

    def delete(self, key: str) -> None:
        async def work(client: aetcd.Client) -> None:
            await client.delete(key.encode())

        self.etcd_call(work)

    def proxy(self, node_id: str) -> ProxyStatus | None:
        async def work(client: aetcd.Client) -> bytes | None:
            result = await client.get(self.keys.proxy(node_id).encode())
            return None if result is None else bytes(result.value)

        value = self.etcd_call(work)
        return None if value is None else ProxyStatus.model_validate_json(value)

    def route_version(self) -> str | None:
        """The version of the route configuration the ingress Envoy holds (its admin /config_dump)."""
        dump = httpx.get(f"http://127.0.0.1:{self.admin_port}/config_dump?resource=dynamic_route_configs").json()
        versions = {config.get("version_info") for config in dump.get("configs", [])}
        return versions.pop() if len(versions) == 1 else None

    def infer(self) -> list[float]:
        with grpc.insecure_channel(f"127.0.0.1:{self.ingress_port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = service_pb2.ModelInferRequest(model_name="obs")
            tensor = request.inputs.add(name="x", datatype="FP32", shape=[2])
            tensor.contents.fp32_contents.extend([1.0, 2.5])
            response = stub.ModelInfer(request, metadata=(("x-hydro-model", "obs"),), timeout=5)
        return list(response.outputs[0].contents.fp32_contents) or [
            float(v) for v in memoryview(response.raw_output_contents[0]).cast("f")
        ]


#: xds_control with an injected fault (refusing_xds_control.py): the NACK test's trigger, since no etcd record
#: makes Envoy refuse anything.
REFUSING_XDS_CONTROL = (str(Path(__file__).with_name("refusing_xds_control.py")),)


@pytest.fixture
def stack(etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path) -> Iterator[Stack]:
    with observed_stack(etcd_server, etcd_prefix, tmp_path, ("-m", "xds_control")) as started:
        yield started


@pytest.fixture
def refusing_stack(etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path) -> Iterator[Stack]:
    """As stack, with xds_control's INJECTED route refusal."""
    with observed_stack(etcd_server, etcd_prefix, tmp_path, REFUSING_XDS_CONTROL) as started:
        yield started


@contextlib.contextmanager
def observed_stack(
    etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path, program: Sequence[str]
) -> Iterator[Stack]:
    """A runtime, xds_control (``program``: the interpreter's arguments before its own) and an ingress Envoy."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.py").write_text(MODEL_PY)
    (model_dir / "serving.yaml").write_text(SERVING_YAML)
    xds_port, metrics_port, ingress_port, admin_port = free_port(), free_port(), free_port(), free_port()
    grpc_port, http_port = free_port(), free_port()
    processes = [
        ChildProcess(
            "runtime",
            [
                *(sys.executable, "-m", "runtimes", "--model-dir", str(model_dir), "--name", "obs"),
                *("--version", "1", "--grpc-port", str(grpc_port), "--http-port", str(http_port)),
            ],
            log_path=tmp_path / "runtime.log",
        ),
        ChildProcess(
            "xds_control",
            [
                *(sys.executable, *program, "--etcd", etcd_server.endpoint, "--prefix", etcd_prefix),
                *("--port", str(xds_port), "--metrics-port", str(metrics_port), "--log-level", "DEBUG"),
            ],
            log_path=tmp_path / "xds.log",
        ),
        ingress_envoy(tmp_path, admin_port=admin_port, xds_port=xds_port, listen_port=ingress_port),
    ]
    try:
        for process in processes:
            process.start()
        processes[0].wait_ready(lambda: http_ok(f"http://127.0.0.1:{http_port}/v2/health/ready"), 60)
        processes[2].wait_ready(lambda: envoy_ready(admin_port), 30)
        yield Stack(etcd_server, Keys(etcd_prefix), ingress_port, admin_port, metrics_port, grpc_port)
    finally:
        for process in reversed(processes):
            process.stop()
        print(processes[1].log_tail(40))


SIGNATURE = Signature(
    inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1])],
    outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1])],
)


def _instance(instance_id: str, address: str, port: int) -> str:
    return Instance(model="obs", version=1, id=instance_id, node="n", address=address, port=port).model_dump_json()


def _base_records(stack: Stack) -> dict[str, str]:
    keys = stack.keys
    artifact = Artifact(digest="sha256:" + "0" * 64, uri="file:///nowhere", size=0)
    model = ModelVersion(name="obs", version=1, runtime="python", artifact=artifact, signature=SIGNATURE)
    app = Application(name="obs", stages=[Stage(variants=[Variant(model="obs", version=1, weight=100)])])
    return {
        keys.model_version("obs", 1): model.model_dump_json(),
        keys.deployment("obs", 1): Deployment(model="obs", version=1, replicas=1).model_dump_json(),
        keys.application("obs"): app.model_dump_json(),
        keys.instance("obs", 1, "good"): _instance("good", "127.0.0.1", stack.runtime_grpc_port),
    }


def test_proxy_status_and_metrics(stack: Stack) -> None:
    wait_until(lambda: (p := stack.proxy("ingress")) is not None and "Listener" in p.acked, 10, "ingress status")
    status = stack.proxy("ingress")
    assert status is not None and status.role == "ingress" and status.last_nack is None
    assert stack.metric("hydro_xds_connected_proxies", role="ingress") == 1
    assert stack.metric("hydro_xds_responses_total", type="Cluster") >= 1

    stack.put(_base_records(stack))
    wait_until(lambda: stack.infer() == [2.0, 5.0], 15, "traffic through the ingress")
    wait_until(lambda: stack.metric("hydro_xds_convergence_seconds_count") >= 1, 10, "a convergence measurement")
    converged = stack.metric("hydro_xds_convergence_seconds_sum") / stack.metric("hydro_xds_convergence_seconds_count")
    assert 0 < converged < 5, converged
    assert stack.metric("hydro_xds_acks_total", type="ClusterLoadAssignment") >= 1
    assert stack.metric("hydro_xds_response_bytes_count", type="RouteConfiguration") >= 1


def _second_app(stack: Stack, name: str) -> dict[str, str]:
    """A second application on the same model version."""
    app = Application(name=name, stages=[Stage(variants=[Variant(model="obs", version=1, weight=100)])])
    return {stack.keys.application(name): app.model_dump_json()}


def test_nack_is_recorded_not_looped_and_recovered(refusing_stack: Stack) -> None:
    stack = refusing_stack
    stack.put(_base_records(stack))
    wait_until(lambda: stack.infer() == [2.0, 5.0], 15, "traffic through the ingress")

    def acked_routes() -> bool:
        # The routes Envoy holds, not just any: the record is written in batches and may still name older ones.
        status = stack.proxy("ingress")
        return status is not None and status.acked.get("RouteConfiguration") == stack.route_version()

    wait_until(acked_routes, 10, "the routes Envoy holds acknowledged in proxies/ingress")
    acked_before = stack.proxy("ingress")
    assert acked_before is not None

    # INJECTED: while an application named 'refused' exists, xds_control sends routes Envoy rejects.
    stack.put(_second_app(stack, REFUSED_APP))

    def nacked() -> bool:
        status = stack.proxy("ingress")
        return status is not None and status.last_nack is not None

    wait_until(nacked, 10, "the NACK recorded under proxies/ingress")
    status = stack.proxy("ingress")
    assert status is not None and status.last_nack is not None
    assert "RouteConfiguration" in status.last_nack and "wildcard" in status.last_nack
    assert status.acked["RouteConfiguration"] == acked_before.acked["RouteConfiguration"]
    assert stack.metric("hydro_xds_nacks_total", type="RouteConfiguration") == 1

    # Traffic keeps flowing on the last good routes, and the rejected version is not sent again.
    responses = stack.metric("hydro_xds_responses_total", type="RouteConfiguration")
    for _ in range(20):
        assert stack.infer() == [2.0, 5.0]
    assert stack.metric("hydro_xds_responses_total", type="RouteConfiguration") == responses
    assert stack.metric("hydro_xds_nacks_total", type="RouteConfiguration") == 1

    # The fix is accepted with the next valid change: the injection over, another application added.
    stack.delete(stack.keys.application(REFUSED_APP))
    stack.put(_second_app(stack, "paused"))

    def accepted() -> bool:
        current = stack.proxy("ingress")
        return current is not None and current.acked["RouteConfiguration"] not in (
            acked_before.acked["RouteConfiguration"],
            "",
        )

    wait_until(accepted, 10, "the fixed routes acknowledged")
    assert stack.infer() == [2.0, 5.0]
    assert stack.metric("hydro_xds_nacks_total", type="RouteConfiguration") == 1
