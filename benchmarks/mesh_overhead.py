"""What the mesh costs: one iris runtime called directly, through its sidecar, and through ingress + sidecar.

Everything runs in this process's run on this machine: etcd, xds_control, the ingress Envoy, one runtime and
its sidecar (started by the deployer's Replica, registered in etcd like any instance). gRPC load comes from
h2load (per-request log for percentiles), REST load from wrk (--latency). Same concurrency for every target.

    python benchmarks/mesh_overhead.py [--quick] [--concurrency 16] [--seconds 15]

The last line printed is a JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.project import enter_project_venv, write_iris_model

enter_project_venv()
# Before gRPC is imported: this process forks children while gRPC runs, and its gRPC calls should cost what the
# mesh's own processes' do (protos/grpc_environment.py).
from protos.grpc_environment import apply_grpc_defaults  # noqa: E402

apply_grpc_defaults()

import aetcd  # noqa: E402
import grpc  # noqa: E402
import httpx  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import h2load, wrk  # noqa: E402
from benchmarks.h2load import need as need  # noqa: E402  (re-exported: tracing_overhead.py imports it from here)
from benchmarks.h2load import run_h2load as run_h2load  # noqa: E402  (re-exported, likewise)
from benchmarks.loop_thread import LoopThread  # noqa: E402
from manager_api.deployer.registration import LeasedInstanceRegistry  # noqa: E402
from manager_api.deployer.replica import Replica, ReplicaConfig  # noqa: E402
from manager_api.etcd_server import EtcdServer  # noqa: E402
from manager_api.ports import free_port  # noqa: E402
from manager_api.processes import ChildProcess, wait_until  # noqa: E402
from protos import inference_pb2, inference_pb2_grpc  # noqa: E402
from protos.topology.applications import Application, Stage, Variant  # noqa: E402
from protos.topology.keys import Keys  # noqa: E402
from xds_control.bootstrap import envoy_ready, ingress_envoy  # noqa: E402

APP = "iris"
#: Direct and sidecar calls name the application as the ingress would (the runtime serves model "iris").
APP_HEADER = "x-hydro-application"
ROW = [5.1, 3.5, 1.4, 0.2]


def grpc_frame() -> bytes:
    """One length-prefixed gRPC message: a ModelInferRequest for one iris row (raw contents)."""
    request = inference_pb2.ModelInferRequest(model_name=APP)
    request.inputs.add(name="input", datatype="FP64", shape=[1, 4])
    request.raw_input_contents.append(np.asarray([ROW], dtype="<f8").tobytes())
    return h2load.grpc_frame(request)


def check_grpc(target: str, headers: dict[str, str]) -> None:
    """One request before the load: h2load counts HTTP 200s, and a gRPC error is an HTTP 200 too."""
    request = inference_pb2.ModelInferRequest.FromString(grpc_frame()[5:])
    with grpc.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request, metadata=tuple(headers.items()), timeout=10)
    names = [o.name for o in response.outputs]
    label = np.frombuffer(response.raw_output_contents[names.index("label")], dtype="<i8")
    if label.tolist() != [0]:
        sys.exit(f"{target} answered label {label.tolist()}, expected [0]")


def check_rest(url: str, headers: dict[str, str]) -> None:
    response = httpx.post(url, content=rest_body(), headers={"content-type": "application/json", **headers})
    labels = {o["name"]: o["data"] for o in response.json().get("outputs", [])}.get("label")
    if response.status_code != 200 or labels != [0]:
        sys.exit(f"{url} answered {response.status_code} {response.text[:200]}, expected label [0]")


def rest_body() -> str:
    return json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP64", "data": [ROW]}]})


def run_wrk(url: str, concurrency: int, seconds: float, headers: dict[str, str]) -> dict[str, float]:
    """REST load with wrk on the iris row; percentiles from --latency."""
    return wrk.run_wrk(url, rest_body(), concurrency, seconds, headers)


async def _start_replica(
    etcd: EtcdServer, keys: Keys, config: ReplicaConfig
) -> tuple[Replica, LeasedInstanceRegistry, aetcd.Client]:
    """Start one runtime + sidecar, registered like the deployer registers them, and route the app to it."""
    client = aetcd.Client(host="127.0.0.1", port=etcd.client_port)
    await client.connect()
    registry = LeasedInstanceRegistry(client, keys, node=config.node)
    await registry.start()
    replica = Replica(config, registry)
    await replica.start()
    app = Application(name=APP, stages=[Stage(variants=[Variant(model=APP, version=1, weight=100)])])
    await client.put(keys.application(APP).encode(), app.model_dump_json().encode())
    return replica, registry, client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs (finishes well within 3 minutes)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0, help="measurement time per target and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are their medians")
    args = parser.parse_args()
    seconds = 3.0 if args.quick else args.seconds
    need("h2load")
    need("wrk")

    work = Path(tempfile.mkdtemp(prefix="hydro-bench-"))
    model_dir = work / "model"
    model_dir.mkdir()
    write_iris_model(model_dir)

    keys = Keys("/bench/")
    etcd = EtcdServer(work).start()
    xds_port, ingress_port, admin_port = free_port(), free_port(), free_port()
    xds = ChildProcess(
        "xds_control",
        [
            sys.executable,
            "-m",
            "xds_control",
            "--etcd",
            etcd.endpoint,
            "--prefix",
            keys.prefix,
            "--port",
            str(xds_port),
            "--log-level",
            "WARNING",
        ],
        log_path=work / "xds.log",
    ).start()
    ingress = ingress_envoy(work, admin_port=admin_port, xds_port=xds_port, listen_port=ingress_port).start()
    # The lease keep-alive must run while the load generators do, so the loop gets a thread of its own.
    loop = LoopThread()
    run = loop.run
    config = ReplicaConfig(
        model=APP,
        version=1,
        model_dir=model_dir,
        node="bench",
        xds_host="127.0.0.1",
        xds_port=xds_port,
        workdir=work,
    )
    replica: Replica | None = None
    registry: LeasedInstanceRegistry | None = None
    client: aetcd.Client | None = None
    results: dict[str, Any] = {}
    try:
        ingress.wait_ready(lambda: envoy_ready(admin_port), 30)
        replica, registry, client = run(_start_replica(etcd, keys, config))
        wait_until(
            lambda: (
                httpx.post(
                    f"http://127.0.0.1:{ingress_port}/v2/models/{APP}/infer",
                    content=rest_body(),
                    headers={"content-type": "application/json"},
                ).is_success
            ),
            30,
            "ingress route",
        )
        frame = work / "request.grpc"
        frame.write_bytes(grpc_frame())
        targets = {
            "direct": (f"127.0.0.1:{replica.grpc_port}", f"127.0.0.1:{replica.http_port}", {}),
            "sidecar": (f"127.0.0.1:{replica.inbound_port}", f"127.0.0.1:{replica.inbound_port}", {}),
            "ingress": (f"127.0.0.1:{ingress_port}", f"127.0.0.1:{ingress_port}", {"x-hydro-model": APP}),
            # gRPC routed on the request's model_name (field extraction + route refresh in the ingress); its
            # REST figures repeat the ingress's.
            "ingress_by_name": (f"127.0.0.1:{ingress_port}", f"127.0.0.1:{ingress_port}", {}),
        }
        # Rounds interleave the targets so that a noisy moment hits all of them; figures are medians of rounds.
        rounds: dict[str, list[float]] = {}
        for name, (grpc_target, rest_target, headers) in targets.items():
            check_grpc(grpc_target, headers)
            via_ingress = name.startswith("ingress")
            check_rest(f"http://{rest_target}/v2/models/{APP}/infer", {} if via_ingress else {APP_HEADER: APP})
        for round_number in range(1, args.rounds + 1):
            for name, (grpc_target, rest_target, headers) in targets.items():
                grpc_result = run_h2load(grpc_target, frame, args.concurrency, seconds, headers)
                rest_result = run_wrk(
                    f"http://{rest_target}/v2/models/{APP}/infer",
                    args.concurrency,
                    seconds,
                    {} if name.startswith("ingress") else {APP_HEADER: APP},
                )
                for proto, result in (("grpc", grpc_result), ("rest", rest_result)):
                    for key, value in result.items():
                        rounds.setdefault(f"{name}_{proto}_{key}", []).append(value)
                    print(
                        f"round {round_number} {name:15s} {proto:4s} rps={result['rps']:9.1f} "
                        f"p50={result['p50_ms']:7.2f} ms p99={result['p99_ms']:7.2f} ms errors={int(result['errors'])}"
                    )
        for key, values in rounds.items():
            results[key] = round(sum(values) if key.endswith("errors") else statistics.median(values), 3)
        for proto in ("grpc", "rest"):
            direct = results[f"direct_{proto}_rps"]
            for name in ("sidecar", "ingress", "ingress_by_name"):
                results[f"{name}_{proto}_rps_ratio"] = round(results[f"{name}_{proto}_rps"] / direct, 3)
            for name in ("ingress", "ingress_by_name"):
                results[f"{name}_{proto}_p99_ratio"] = round(
                    results[f"{name}_{proto}_p99_ms"] / max(results[f"direct_{proto}_p99_ms"], 1e-9), 3
                )
        results["concurrency"] = args.concurrency
        results["seconds_per_target"] = seconds
        results["rounds"] = args.rounds
    finally:
        if replica is not None:
            run(replica.stop(drain=False))
        if registry is not None:
            run(registry.stop())
        if client is not None:
            run(client.close())
        loop.stop()
        ingress.stop()
        xds.stop()
        etcd.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    main()
