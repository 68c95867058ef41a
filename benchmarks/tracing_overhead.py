"""What tracing costs: throughput through the ingress with tracing off, with a collector configured but not
listening, and with every request traced (100 % sampling) to a live OTLP receiver.

Four copies of the mesh run side by side on one etcd, each with its own xds_control (the same flags but
``--otlp-endpoint``), ingress Envoy and one iris replica (runtime + sidecar, started by the deployer's Replica);
their runtimes get OTEL_EXPORTER_OTLP_ENDPOINT like `hydro up --otlp-endpoint` gives it. The live receiver is
a grpc.aio OTLP TraceService in this process that takes each export as bytes and counts its spans without
decoding them (a collector's own cost is not what is measured). Load: wrk (REST) and h2load (gRPC) through each
ingress, in rounds: every round runs each configuration once, back to back, in a rotated order.

The machine this runs on is shared, so its speed drifts between rounds by more than the effect measured. A drop
is therefore taken within each round (a configuration against tracing off of the same round, seconds apart) and
the median over rounds is reported. Next to throughput, the CPU time each process of the mesh (ingress Envoy,
sidecar Envoy, runtime; this process, which hosts the receiver) spent per request is read from /proc/PID/stat:
what tracing costs each process, and steadier than throughput while other work competes for the cores.

    python benchmarks/tracing_overhead.py [--quick] [--concurrency 16] [--seconds 10] [--rounds 5]

The fourth mesh, ``control``, is a second one with tracing off: ``control_drop_pct`` and
``control_cpu_overhead_pct`` are what two identical meshes differ by in this run, the floor the other figures
are read against. It was up to 20 % of CPU per request and 34 % of gRPC throughput until the listeners balanced
connections exactly over Envoy's workers: each ingress worker keeps one HTTP/2 connection to the sidecar, the
kernel gave each a random sidecar worker, and a mesh whose two landed on one worker ran its sidecar on one
thread and spent ~16 % more CPU per gRPC request in every process, for the whole run (docs/tracing.md, Cost).
``{name}_sidecar_connections_per_worker`` shows how each mesh's connections fell: one per worker is expected in
every mesh now.

The last line printed is a JSON object of the figures; ``no_collector_drop_pct`` and ``full_sampling_drop_pct``
are the larger of the REST and gRPC throughput drops against tracing off (negative: no drop);
``*_cpu_overhead_pct`` is the extra CPU per request of the mesh's own processes.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
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

from benchmarks.loop_thread import LoopThread  # noqa: E402
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
from manager_api.ports import free_port  # noqa: E402
from manager_api.processes import ChildProcess, wait_until  # noqa: E402
from protos.topology.applications import Application, Stage, Variant  # noqa: E402
from protos.topology.keys import Keys  # noqa: E402
from xds_control.bootstrap import connections_per_worker, envoy_ready, ingress_envoy  # noqa: E402

APP = "iris"
#: "control" is a second mesh with tracing off: its "drop" against "off" is what two identical meshes differ by.
CONFIGS = ("off", "control", "no_collector", "full_sampling")


EXPORT_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
#: Wire types of protobuf fields: varint, 64-bit, length-delimited, 32-bit.
VARINT, I64, LEN, I32 = 0, 1, 2, 5


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def _fields(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field of the message in data[start:end]."""
    found = []
    at = start
    while at < end:
        key, at = _varint(data, at)
        wire = key & 7
        if wire == VARINT:
            _, at = _varint(data, at)
        elif wire == I64:
            at += 8
        elif wire == I32:
            at += 4
        elif wire == LEN:
            size, at = _varint(data, at)
            found.append((key >> 3, at, at + size))
            at += size
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
    return found


def count_spans(request: bytes) -> int:
    """Spans in a serialized ExportTraceServiceRequest, found by walking resource_spans (1) -> scope_spans (2) ->
    spans (2) without decoding the spans themselves."""
    count = 0
    for number, start, end in _fields(request, 0, len(request)):
        if number != 1:
            continue
        for scope_number, scope_start, scope_end in _fields(request, start, end):
            if scope_number == 2:
                count += sum(1 for span_number, _, _ in _fields(request, scope_start, scope_end) if span_number == 2)
    return count


class CountingReceiver:
    """An OTLP trace collector that counts spans and bytes (a live, cheap Jaeger stand-in)."""

    def __init__(self) -> None:
        self.spans = 0
        self.bytes = 0
        self.exports = 0

    async def export(self, request: bytes, context: Any) -> bytes:
        self.exports += 1
        self.spans += count_spans(request)
        self.bytes += len(request)
        return b""  # an empty ExportTraceServiceResponse: everything accepted


async def serve_receiver(receiver: CountingReceiver) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    # No (de)serializers: the request arrives as bytes, and the answer goes as bytes.
    handler = grpc.unary_unary_rpc_method_handler(receiver.export)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(EXPORT_SERVICE, {"Export": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat; its children are not included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PROCESSES = ("ingress", "sidecar", "runtime", "benchmark")


@dataclass
class Mesh:
    """One copy of the mesh: its processes and its ingress port."""

    xds: ChildProcess
    ingress: ChildProcess
    ingress_port: int
    replica: Replica | None = None
    registry: LeasedInstanceRegistry | None = None

    def pids(self) -> dict[str, int]:
        """The processes whose CPU time is measured (the benchmark process hosts the receiver)."""
        assert self.replica is not None and self.replica.runtime is not None and self.replica.sidecar is not None
        pids = {"ingress": self.ingress.pid, "sidecar": self.replica.sidecar.pid, "runtime": self.replica.runtime.pid}
        return {name: pid for name, pid in pids.items() if pid is not None} | {"benchmark": os.getpid()}


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


def sidecar_connections_per_worker(mesh: Mesh) -> list[int] | str:
    """Open connections (the ingress workers') on each worker of the mesh's sidecar inbound listener: how the
    mesh's connections fell over the workers, which sets its CPU per request for as long as they live. An error
    reading them is reported in their place rather than losing the run's figures."""
    assert mesh.replica is not None
    try:
        return connections_per_worker(mesh.replica.admin_port, mesh.replica.inbound_port)
    except (httpx.HTTPError, ValueError) as exc:
        return f"unknown: {exc}"


def measured(mesh: Mesh, load: Callable[[], dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Run ``load`` against ``mesh``: its figures, and each process's CPU microseconds per request. Requests are
    the load's rate times its wall time (h2load's warm-up second is not in its count)."""
    pids = mesh.pids()
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    started = time.monotonic()
    result = load()
    elapsed = time.monotonic() - started
    after = {name: cpu_seconds(pid) for name, pid in pids.items()}
    requests = max(1.0, result["rps"] * elapsed)
    return result, {name: 1e6 * (after[name] - before[name]) / requests for name in pids}


def paired_drops(rounds: dict[str, list[float]], name: str, proto: str) -> list[float]:
    """Per round, the throughput drop of ``name`` against tracing off in the same round (percent)."""
    base, other = rounds[f"off_{proto}_rps"], rounds[f"{name}_{proto}_rps"]
    return [100 * (b - o) / b for b, o in zip(base, other, strict=True) if b > 0]


def paired_cpu_overheads(cpu: dict[str, list[float]], name: str, proto: str) -> list[float]:
    """Per round, the extra CPU per request of the mesh's own processes against tracing off (percent)."""
    own = ("ingress", "sidecar", "runtime")
    base = [sum(values) for values in zip(*(cpu[f"off_{proto}_{p}"] for p in own), strict=True)]
    other = [sum(values) for values in zip(*(cpu[f"{name}_{proto}_{p}"] for p in own), strict=True)]
    return [100 * (o - b) / b for b, o in zip(base, other, strict=True) if b > 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs (finishes well within 3 minutes)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0, help="measurement time per target and round")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 5, --quick 8)")
    args = parser.parse_args()
    # Quick runs are more, shorter rounds: on a shared machine the median of many short rounds is steadier, and
    # the configurations of one round run closer together.
    seconds = 1.0 if args.quick else args.seconds
    args.rounds = args.rounds or (8 if args.quick else 5)
    need("h2load")
    need("wrk")

    work = Path(tempfile.mkdtemp(prefix="hydro-tracing-bench-"))
    model_dir = work / "model"
    model_dir.mkdir()
    write_iris_model(model_dir)
    dead_endpoint = f"127.0.0.1:{free_port()}"  # nothing listens there

    etcd = EtcdServer(work).start()
    loop = LoopThread()
    run = loop.run
    receiver = CountingReceiver()
    server, receiver_port = run(serve_receiver(receiver))
    endpoints = {
        "off": None,
        "control": None,
        "no_collector": dead_endpoint,
        "full_sampling": f"127.0.0.1:{receiver_port}",
    }
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
        cpu: dict[str, list[float]] = {}
        for round_number in range(1, args.rounds + 1):
            # Each round starts with another configuration, so that none always runs right after another.
            shift = (round_number - 1) % len(CONFIGS)
            for name in CONFIGS[shift:] + CONFIGS[:shift]:
                mesh = meshes[name]
                port = mesh.ingress_port
                loads = {
                    "grpc": functools.partial(
                        run_h2load, f"127.0.0.1:{port}", frame, args.concurrency, seconds, {"x-hydro-model": APP}
                    ),
                    "rest": functools.partial(
                        run_wrk, f"http://127.0.0.1:{port}/v2/models/{APP}/infer", args.concurrency, seconds, {}
                    ),
                }
                for proto, load in loads.items():
                    result, cpu_per_request = measured(mesh, load)
                    for key, value in result.items():
                        rounds.setdefault(f"{name}_{proto}_{key}", []).append(value)
                    for process, micros in cpu_per_request.items():
                        cpu.setdefault(f"{name}_{proto}_{process}", []).append(micros)
                    print(
                        f"round {round_number} {name:13s} {proto:4s} rps={result['rps']:9.1f} "
                        f"p50={result['p50_ms']:7.2f} ms p99={result['p99_ms']:7.2f} ms errors={int(result['errors'])} "
                        "cpu us/request "
                        + " ".join(f"{process}={micros:.0f}" for process, micros in cpu_per_request.items()),
                        flush=True,
                    )
        for key, values in rounds.items():
            results[key] = round(sum(values) if key.endswith("errors") else statistics.median(values), 3)
        for key, values in cpu.items():
            results[f"{key}_cpu_us_per_request"] = round(statistics.median(values), 1)
        for name in CONFIGS[1:]:  # each against the first, tracing off
            drops, overheads = [], []
            for proto in ("grpc", "rest"):
                drop = round(statistics.median(paired_drops(rounds, name, proto)), 2)
                results[f"{name}_{proto}_drop_pct"] = drop
                drops.append(drop)
                overhead = round(statistics.median(paired_cpu_overheads(cpu, name, proto)), 2)
                results[f"{name}_{proto}_cpu_overhead_pct"] = overhead
                overheads.append(overhead)
            results[f"{name}_drop_pct"] = max(drops)
            results[f"{name}_cpu_overhead_pct"] = max(overheads)
        for name, mesh in meshes.items():
            results[f"{name}_sidecar_connections_per_worker"] = sidecar_connections_per_worker(mesh)
        results["spans_received"] = receiver.spans
        results["span_bytes_received"] = receiver.bytes
        results["exports_received"] = receiver.exports
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
        loop.stop()
        etcd.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    main()
