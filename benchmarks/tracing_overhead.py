"""What tracing costs: throughput through the ingress with tracing off, with a collector configured but not
listening, and with every request traced (100 % sampling) to a live OTLP receiver.

Three copies of the mesh run side by side on one etcd, each with its own xds_control (the same flags but
``--otlp-endpoint``), ingress Envoy and one iris replica (runtime + sidecar, started by the deployer's Replica);
their runtimes get OTEL_EXPORTER_OTLP_ENDPOINT like `hydro up --otlp-endpoint` gives it. The live receiver is
a grpc.aio OTLP TraceService in this process that counts the spans it gets. Load: wrk (REST) and h2load (gRPC)
through each ingress, rounds interleaved so that a noisy moment hits every configuration; figures are medians.

    python benchmarks/tracing_overhead.py [--quick] [--concurrency 16] [--seconds 10] [--rounds 5]

The last line printed is a JSON object of the figures; ``no_collector_drop_pct`` and ``full_sampling_drop_pct``
are the larger of the REST and gRPC throughput drops against tracing off (negative: no drop).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import runpy
import shutil
import statistics
import sys
import tempfile
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
if Path(sys.prefix).resolve() != VENV_PYTHON.parent.parent.resolve() and VENV_PYTHON.exists():
    # `python benchmarks/tracing_overhead.py` with the system Python: run again inside the project's venv.
    os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), *sys.argv])
sys.path.insert(0, str(ROOT))

import aetcd  # noqa: E402
import grpc  # noqa: E402
import httpx  # noqa: E402
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc  # noqa: E402

from benchmarks.mesh_overhead import (  # noqa: E402
    check_grpc,
    check_rest,
    grpc_frame,
    need,
    rest_body,
    run_h2load,
    run_wrk,
)
from manager_api.deployer.registration import LeasedInstanceRegistry  # noqa: E402
from manager_api.deployer.replica import Replica, ReplicaConfig  # noqa: E402
from manager_api.etcd_server import EtcdServer  # noqa: E402
from manager_api.processes import ChildProcess, free_port, wait_until  # noqa: E402
from protos.topology import Application, Keys, Stage, Variant  # noqa: E402
from xds_control.bootstrap import envoy_ready, ingress_envoy  # noqa: E402

T = TypeVar("T")
APP = "iris"
CONFIGS = ("off", "no_collector", "full_sampling")


class CountingReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace collector that only counts spans (a live, cheap Jaeger stand-in)."""

    def __init__(self) -> None:
        self.spans = 0

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.spans += sum(len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


async def _serve_receiver(receiver: CountingReceiver) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@dataclass
class Mesh:
    """One copy of the mesh: its processes and its ingress port."""

    xds: ChildProcess
    ingress: ChildProcess
    ingress_port: int
    replica: Replica | None = None
    registry: LeasedInstanceRegistry | None = None


def start_mesh(
    name: str, etcd: EtcdServer, keys: Keys, work: Path, model_dir: Path, otlp_endpoint: str | None
) -> tuple[Mesh, ReplicaConfig, dict[str, str]]:
    """xds_control and the ingress of one configuration; the replica config and the runtime's environment."""
    xds_port, ingress_port, admin_port = free_port(), free_port(), free_port()
    argv = [sys.executable, "-m", "xds_control", "--etcd", etcd.endpoint, "--prefix", keys.prefix]
    argv += ["--port", str(xds_port), "--log-level", "WARNING"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if otlp_endpoint is not None:
        argv += ["--otlp-endpoint", otlp_endpoint]
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://{otlp_endpoint}"
    folder = work / name
    xds = ChildProcess(f"xds_control-{name}", argv, env=env, log_path=folder / "xds.log").start()
    ingress = ingress_envoy(
        folder, admin_port=admin_port, xds_port=xds_port, listen_port=ingress_port, node_id=f"ingress-{name}"
    ).start()
    ingress.wait_ready(lambda: envoy_ready(admin_port), 30)
    config = ReplicaConfig(
        model=APP, version=1, model_dir=model_dir, node=name, xds_host="127.0.0.1", xds_port=xds_port, workdir=folder
    )
    return Mesh(xds, ingress, ingress_port), config, env


async def start_replica(
    client: aetcd.Client, keys: Keys, config: ReplicaConfig, env: dict[str, str]
) -> tuple[Replica, LeasedInstanceRegistry]:
    """Start the replica with the configuration's environment (Replica starts its runtime with ours)."""
    registry = LeasedInstanceRegistry(client, keys, node=config.node)
    await registry.start()
    app = Application(name=APP, stages=[Stage(variants=[Variant(model=APP, version=1, weight=100)])])
    await client.put(keys.application(APP).encode(), app.model_dump_json().encode())
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        replica = Replica(config, registry)
        await replica.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return replica, registry


def answers(url: str) -> bool:
    return httpx.post(url, content=rest_body(), headers={"content-type": "application/json"}).is_success


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs (finishes well within 3 minutes)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0, help="measurement time per target and round")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 5, --quick 7)")
    args = parser.parse_args()
    # Quick runs are more, shorter rounds: on a shared machine the median of many short rounds is steadier.
    seconds = 2.0 if args.quick else args.seconds
    args.rounds = args.rounds or (7 if args.quick else 5)
    need("h2load")
    need("wrk")

    work = Path(tempfile.mkdtemp(prefix="hydro-tracing-bench-"))
    model_dir = work / "model"
    model_dir.mkdir()
    shutil.copy(ROOT / "examples" / "iris" / "serving.yaml", model_dir)
    runpy.run_path(str(ROOT / "examples" / "iris" / "train.py"))["train"](model_dir)
    dead_endpoint = f"127.0.0.1:{free_port()}"  # nothing listens there

    etcd = EtcdServer(work).start()
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, name="asyncio", daemon=True)
    loop_thread.start()

    def run(coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result()

    receiver = CountingReceiver()
    server, receiver_port = run(_serve_receiver(receiver))
    endpoints = {"off": None, "no_collector": dead_endpoint, "full_sampling": f"127.0.0.1:{receiver_port}"}
    meshes: dict[str, Mesh] = {}
    client = aetcd.Client(host="127.0.0.1", port=etcd.client_port)
    results: dict[str, Any] = {}
    try:
        run(client.connect())
        for name in CONFIGS:
            keys = Keys(f"/bench-{name}/")
            mesh, config, env = start_mesh(name, etcd, keys, work, model_dir, endpoints[name])
            meshes[name] = mesh
            mesh.replica, mesh.registry = run(start_replica(client, keys, config, env))
            url = f"http://127.0.0.1:{mesh.ingress_port}/v2/models/{APP}/infer"
            wait_until(functools.partial(answers, url), 30, f"the {name} ingress route")
            check_grpc(f"127.0.0.1:{mesh.ingress_port}", {"x-hydro-model": APP})
            check_rest(url, {})
        # Whether each ingress traces when the load starts (with no collector, xds_control has taken tracing out).
        for name, mesh in meshes.items():
            url = f"http://127.0.0.1:{mesh.ingress_port}/v2/models/{APP}/infer"
            response = httpx.post(url, content=rest_body(), headers={"content-type": "application/json"})
            results[f"{name}_ingress_traces"] = "x-hydro-trace-id" in response.headers
        frame = work / "request.grpc"
        frame.write_bytes(grpc_frame())
        rounds: dict[str, list[float]] = {}
        for round_number in range(1, args.rounds + 1):
            # Each round starts with another configuration, so that none always runs right after another.
            shift = (round_number - 1) % len(CONFIGS)
            for name in CONFIGS[shift:] + CONFIGS[:shift]:
                port = meshes[name].ingress_port
                grpc_result = run_h2load(f"127.0.0.1:{port}", frame, args.concurrency, seconds, {"x-hydro-model": APP})
                rest_result = run_wrk(f"http://127.0.0.1:{port}/v2/models/{APP}/infer", args.concurrency, seconds, {})
                for proto, result in (("grpc", grpc_result), ("rest", rest_result)):
                    for key, value in result.items():
                        rounds.setdefault(f"{name}_{proto}_{key}", []).append(value)
                    print(
                        f"round {round_number} {name:13s} {proto:4s} rps={result['rps']:9.1f} "
                        f"p50={result['p50_ms']:7.2f} ms p99={result['p99_ms']:7.2f} ms errors={int(result['errors'])}",
                        flush=True,
                    )
        for key, values in rounds.items():
            results[key] = round(sum(values) if key.endswith("errors") else statistics.median(values), 3)
        for name in ("no_collector", "full_sampling"):
            drops = []
            for proto in ("grpc", "rest"):
                base = results[f"off_{proto}_rps"]
                drop = round(100 * (base - results[f"{name}_{proto}_rps"]) / base, 2)
                results[f"{name}_{proto}_drop_pct"] = drop
                drops.append(drop)
            results[f"{name}_drop_pct"] = max(drops)
        results["spans_received"] = receiver.spans
        results["concurrency"] = args.concurrency
        results["seconds_per_target"] = seconds
        results["rounds"] = args.rounds
        results["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    finally:
        for mesh in meshes.values():
            if mesh.replica is not None:
                try:
                    run(mesh.replica.stop(drain=False))
                    # Its lease keep-alive task must end before the loop closes (else asyncio warns after the JSON).
                    if mesh.registry is not None:
                        run(mesh.registry.stop())
                except Exception as exc:
                    print(f"stopping a replica failed: {exc!r}", file=sys.stderr)
            mesh.ingress.stop()
            mesh.xds.stop()
        run(client.close())
        run(server.stop(0.5))
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join()
        loop.close()
        etcd.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    main()
