"""Our runtime against MLServer on the same scikit-learn iris model, plus what adaptive batching buys.

Servers, all on this machine, started by this run and stopped at its end:
- ours: `python -m runtimes` on the iris example (examples/iris/train.py), one process, no batching;
- MLServer 1.7 (`mlserver start`, from .venv-mlserver made by `make bench-deps`) with mlserver-sklearn on the
  same joblib file, `parallel_workers: 0` so that it too predicts in its one server process (equal worker counts;
  MLServer's default of 1 would add an inference process), metrics off, access log off (`debug: false`), and
  the same grpcio settings as ours (protos/grpc_environment.py, inherited from this process): the comparison
  is of the servers, not of grpcio's I/O engines;
- for batching: a python model with a fixed per-call cost (2 ms of CPU, whatever the batch size: what a framework
  call, feature lookup or Python pre-processing costs), served by our runtime without and with
  `--max-batch-size 64 --max-batch-delay-ms 10`; and the iris model with the same batching, for an honest number on
  a model whose per-call cost is small.

Requests are one iris row and ask for both outputs (class and probabilities) from both servers, so both do the
same work: MLServer computes only `predict` unless `predict_proba` is requested too. gRPC load comes from h2load
with a pre-encoded ModelInferRequest (raw input contents; MLServer serves the same OIP service), REST load from
wrk (--latency). Every server is checked to answer correctly before any load. Rounds interleave the servers so
that a noisy moment hits all of them; figures are medians of the rounds.

    python benchmarks/runtime_vs_mlserver.py [--quick] [--seconds 5] [--rounds 3] [--concurrency 1,16,64]

The last line printed is a JSON object of the figures (ratios are ours / MLServer).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.project import ROOT, enter_project_venv, write_iris_model

enter_project_venv()
# Before gRPC is imported: this process forks children while gRPC runs, and its gRPC calls should cost what the
# mesh's own processes' do (protos/grpc_environment.py).
from protos.grpc_environment import apply_grpc_defaults  # noqa: E402

apply_grpc_defaults()

import grpc  # noqa: E402
import httpx  # noqa: E402
import joblib  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import h2load, wrk  # noqa: E402
from benchmarks.h2load import need  # noqa: E402
from manager_api.ports import free_port  # noqa: E402
from manager_api.processes import ChildProcess, http_ok  # noqa: E402
from protos import inference_pb2, inference_pb2_grpc  # noqa: E402

MLSERVER = ROOT / ".venv-mlserver" / "bin" / "mlserver"
ROW = [5.1, 3.5, 1.4, 0.2]
BATCH_SIZE = 64
# A request costs 0.3-0.5 ms of event-loop CPU here, so a 2 ms window collects only ~5 requests (measured: average
# batch 5.8 and 1,450 rps for the fixed-cost model over gRPC at c=64); 10 ms collects ~30 (2,650 rps).
BATCH_DELAY_MS = 10.0

#: The batching demo model: a fixed cost per call, whatever the number of rows.
FIXED_COST_MODEL = """
import time

COST_SECONDS = 0.002


def predict(inputs):
    # CPU work (it holds the GIL, like most Python pre-processing) that does not grow with the batch.
    deadline = time.thread_time() + COST_SECONDS
    while time.thread_time() < deadline:
        pass
    return {"y": inputs["x"] * 2}
"""
FIXED_COST_SERVING = """
runtime: python
files: [model.py]
entrypoint: model:predict
signature:
  inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]
  outputs: [{name: y, datatype: FP32, shape: [-1, 4]}]
"""


@dataclass
class Server:
    """One server under test and how to talk to it."""

    name: str
    process: ChildProcess
    grpc_port: int
    http_port: int
    model: str
    input_name: str
    datatype: str
    outputs: list[str]
    work: Path
    frame: Path = field(init=False)

    def __post_init__(self) -> None:
        self.frame = self.work / f"{self.name}.grpc"
        self.frame.write_bytes(h2load.grpc_frame(self.grpc_request()))

    @property
    def infer_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v2/models/{self.model}/infer"

    def row(self) -> np.ndarray:
        return np.asarray([ROW], dtype="<f8" if self.datatype == "FP64" else "<f4")

    def grpc_request(self) -> inference_pb2.ModelInferRequest:
        request = inference_pb2.ModelInferRequest(model_name=self.model)
        request.inputs.add(name=self.input_name, datatype=self.datatype, shape=[1, 4])
        for name in self.outputs:
            request.outputs.add(name=name)
        request.raw_input_contents.append(self.row().tobytes())
        return request

    def rest_body(self) -> str:
        tensor = {"name": self.input_name, "shape": [1, 4], "datatype": self.datatype, "data": [ROW]}
        return json.dumps({"inputs": [tensor], "outputs": [{"name": n} for n in self.outputs]})


def check(server: Server, expected: dict[str, np.ndarray]) -> None:
    """One gRPC and one REST request; exit if either answer is not the expected outputs (h2load counts a gRPC
    error as HTTP 200, so a wrong answer would otherwise pass as throughput)."""
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(server.grpc_request(), timeout=10)
    got = {}
    for index, output in enumerate(response.outputs):
        dtype = {"INT64": "<i8", "FP64": "<f8", "FP32": "<f4"}[output.datatype]
        got[output.name] = np.frombuffer(response.raw_output_contents[index], dtype=dtype).reshape(-1)
    rest = httpx.post(server.infer_url, content=server.rest_body(), headers={"content-type": "application/json"})
    if rest.status_code != 200:
        sys.exit(f"{server.name}: REST answered {rest.status_code} {rest.text[:300]}")
    got_rest = {o["name"]: np.asarray(o["data"]).reshape(-1) for o in rest.json()["outputs"]}
    for protocol, outputs in (("gRPC", got), ("REST", got_rest)):
        for name, want in expected.items():
            if name not in outputs or not np.allclose(outputs[name], want, rtol=1e-6, atol=1e-9):
                sys.exit(f"{server.name}: {protocol} output {name} = {outputs.get(name)}, expected {want}")


def run_h2load(server: Server, concurrency: int, seconds: float) -> dict[str, float]:
    """gRPC load with h2load (one connection per client, one stream at a time); percentiles from its log."""
    return h2load.run_h2load(f"127.0.0.1:{server.grpc_port}", server.frame, concurrency, seconds)


def run_wrk(server: Server, concurrency: int, seconds: float) -> dict[str, float]:
    """REST load with wrk (HTTP/1.1 keep-alive); percentiles from --latency."""
    return wrk.run_wrk(server.infer_url, server.rest_body(), concurrency, seconds)


def start_ours(
    name: str, model_dir: Path, work: Path, model: str, batching: tuple[int, float] | None = None
) -> tuple[ChildProcess, int, int]:
    """`python -m runtimes` on free ports (not yet ready)."""
    grpc_port, http_port = free_port(), free_port()
    argv = [sys.executable, "-m", "runtimes", "--model-dir", str(model_dir), "--name", model, "--version", "1"]
    argv += ["--grpc-port", str(grpc_port), "--http-port", str(http_port), "--log-level", "warning"]
    if batching is not None:
        argv += ["--max-batch-size", str(batching[0]), "--max-batch-delay-ms", str(batching[1])]
    process = ChildProcess(name, argv, cwd=ROOT, log_path=work / f"{name}.log").start()
    return process, grpc_port, http_port


def start_mlserver(model_file: Path, work: Path) -> tuple[ChildProcess, int, int]:
    """`mlserver start` on a folder with settings.json and iris/model-settings.json (not yet ready)."""
    if not MLSERVER.exists():
        sys.exit(f"{MLSERVER} is missing: run `make bench-deps` first")
    root = work / "mlserver"
    (root / "iris").mkdir(parents=True)
    shutil.copy(model_file, root / "iris" / "model.joblib")
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    settings = {
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,
        # Inference in the server process, like ours (the default 1 adds a worker process).
        "parallel_workers": 0,
        "metrics_endpoint": None,
        # debug=false turns uvicorn's access log off (ours is off too).
        "debug": False,
    }
    (root / "settings.json").write_text(json.dumps(settings))
    model_settings = {
        "name": "iris",
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": "1"},
    }
    (root / "iris" / "model-settings.json").write_text(json.dumps(model_settings))
    process = ChildProcess("mlserver", [str(MLSERVER), "start", str(root)], cwd=root, log_path=work / "mlserver.log")
    return process.start(), grpc_port, http_port


def median_of(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 s per measurement, 2 rounds (about 2.5 minutes)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measurement time per server, load and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are their medians")
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated client counts")
    args = parser.parse_args()
    seconds = 2.0 if args.quick else args.seconds
    rounds = 2 if args.quick else args.rounds
    levels = [int(c) for c in args.concurrency.split(",")]
    need("h2load")
    need("wrk")

    work = Path(tempfile.mkdtemp(prefix="hydro-vs-mlserver-"))
    iris_dir = work / "iris"
    iris_dir.mkdir()
    model_file = write_iris_model(iris_dir)
    fixed_dir = work / "fixed-cost"
    fixed_dir.mkdir()
    (fixed_dir / "model.py").write_text(FIXED_COST_MODEL)
    (fixed_dir / "serving.yaml").write_text(FIXED_COST_SERVING)

    processes: list[ChildProcess] = []
    results: dict[str, Any] = {}
    try:
        # Start everything first: imports and model loads overlap.
        ours = start_ours("ours", iris_dir, work, "iris")
        mlserver = start_mlserver(model_file, work)
        fixed = start_ours("fixed", fixed_dir, work, "fixed")
        fixed_batched = start_ours("fixed_batched", fixed_dir, work, "fixed", (BATCH_SIZE, BATCH_DELAY_MS))
        iris_batched = start_ours("ours_batched", iris_dir, work, "iris", (BATCH_SIZE, BATCH_DELAY_MS))
        started = [ours, mlserver, fixed, fixed_batched, iris_batched]
        processes = [p for p, _, _ in started]
        ready_paths = ["/v2/health/ready", "/v2/models/iris/ready", *["/v2/health/ready"] * 3]
        for (process, _, http_port), path in zip(started, ready_paths, strict=True):
            process.wait_ready(functools.partial(http_ok, f"http://127.0.0.1:{http_port}{path}"), 90)

        iris_out = ["label", "probabilities"]
        servers = {
            "ours": Server("ours", ours[0], ours[1], ours[2], "iris", "input", "FP64", iris_out, work),
            "mlserver": Server("mlserver", *mlserver, "iris", "input", "FP64", ["predict", "predict_proba"], work),
            "fixed": Server("fixed", *fixed, "fixed", "x", "FP32", ["y"], work),
            "fixed_batched": Server("fixed_batched", *fixed_batched, "fixed", "x", "FP32", ["y"], work),
            "ours_batched": Server("ours_batched", *iris_batched, "iris", "input", "FP64", iris_out, work),
        }
        estimator = joblib.load(model_file)
        row = np.asarray([ROW])
        label, proba = estimator.predict(row), estimator.predict_proba(row)
        check(servers["ours"], {"label": label, "probabilities": proba})
        check(servers["ours_batched"], {"label": label, "probabilities": proba})
        check(servers["mlserver"], {"predict": label, "predict_proba": proba})
        doubled = np.asarray(ROW, dtype=np.float32) * 2
        check(servers["fixed"], {"y": doubled})
        check(servers["fixed_batched"], {"y": doubled})

        # What is measured: (server, protocol, concurrency).
        plan = [(s, p, c) for c in levels for s in ("ours", "mlserver") for p in ("grpc", "rest")]
        top = max(levels)
        plan += [(s, p, top) for s in ("fixed", "fixed_batched", "ours_batched") for p in ("grpc", "rest")]
        samples: dict[str, list[float]] = {}
        for round_number in range(1, rounds + 1):
            for server_name, protocol, concurrency in plan:
                server = servers[server_name]
                runner = run_h2load if protocol == "grpc" else run_wrk
                result = runner(server, concurrency, seconds)
                for key, value in result.items():
                    samples.setdefault(f"{server_name}_{protocol}_c{concurrency}_{key}", []).append(value)
                print(
                    f"round {round_number} {server_name:13s} {protocol:4s} c={concurrency:<3d} "
                    f"rps={result['rps']:8.1f} p50={result['p50_ms']:7.2f} ms p99={result['p99_ms']:7.2f} ms "
                    f"errors={int(result['errors'])}",
                    flush=True,
                )
        for key, values in samples.items():
            results[key] = sum(values) if key.endswith("errors") else median_of(values)
        for protocol in ("grpc", "rest"):
            for concurrency in levels:
                base = f"_{protocol}_c{concurrency}_"
                results[f"{protocol}_rps_ratio_c{concurrency}"] = round(
                    results[f"ours{base}rps"] / results[f"mlserver{base}rps"], 3
                )
                results[f"{protocol}_p99_ratio_c{concurrency}"] = round(
                    results[f"ours{base}p99_ms"] / max(results[f"mlserver{base}p99_ms"], 1e-9), 3
                )
                # Each round's own ratio: how far apart rounds are says how much to trust the median.
                results[f"{protocol}_rps_ratio_c{concurrency}_rounds"] = [
                    round(ours / max(theirs, 1e-9), 3)
                    for ours, theirs in zip(samples[f"ours{base}rps"], samples[f"mlserver{base}rps"], strict=True)
                ]
            results[f"{protocol}_batching_speedup_c{top}"] = round(
                results[f"fixed_batched_{protocol}_c{top}_rps"] / results[f"fixed_{protocol}_c{top}_rps"], 3
            )
            results[f"iris_{protocol}_batching_speedup_c{top}"] = round(
                results[f"ours_batched_{protocol}_c{top}_rps"] / results[f"ours_{protocol}_c{top}_rps"], 3
            )
        results[f"batching_speedup_c{top}"] = results[f"grpc_batching_speedup_c{top}"]
        if top != 64:
            results["batching_speedup_c64"] = results[f"batching_speedup_c{top}"]
        results.update(
            seconds_per_measurement=seconds,
            rounds=rounds,
            concurrency=levels,
            batching={"max_batch_size": BATCH_SIZE, "max_delay_ms": BATCH_DELAY_MS},
            mlserver_parallel_workers=0,
            cpus=os.cpu_count(),
        )
        print_table(results, levels, top)
    finally:
        for process in processes:
            process.stop(grace=10)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, sort_keys=True))


def print_table(results: dict[str, Any], levels: list[int], top: int) -> None:
    """The medians as a table (ours vs MLServer, then batching)."""
    print()
    print(
        f"{'protocol':8s} {'c':>3s} | {'ours rps':>9s} {'p50':>7s} {'p99':>7s} | {'MLServer rps':>12s} "
        f"{'p50':>7s} {'p99':>7s} | {'rps x':>6s} {'p99 x':>6s}"
    )
    for protocol in ("grpc", "rest"):
        for c in levels:
            ours, theirs = f"ours_{protocol}_c{c}_", f"mlserver_{protocol}_c{c}_"
            print(
                f"{protocol:8s} {c:3d} | {results[ours + 'rps']:9.1f} {results[ours + 'p50_ms']:7.2f} "
                f"{results[ours + 'p99_ms']:7.2f} | {results[theirs + 'rps']:12.1f} {results[theirs + 'p50_ms']:7.2f} "
                f"{results[theirs + 'p99_ms']:7.2f} | {results[f'{protocol}_rps_ratio_c{c}']:6.2f} "
                f"{results[f'{protocol}_p99_ratio_c{c}']:6.2f}"
            )
    print()
    print(f"batching (max_batch_size {BATCH_SIZE}, max_delay_ms {BATCH_DELAY_MS}) at c={top}:")
    for label, plain, batched in (
        ("fixed-cost python model", "fixed", "fixed_batched"),
        ("iris (sklearn)", "ours", "ours_batched"),
    ):
        for protocol in ("grpc", "rest"):
            a, b = f"{plain}_{protocol}_c{top}_", f"{batched}_{protocol}_c{top}_"
            print(
                f"  {label:24s} {protocol:4s} off {results[a + 'rps']:8.1f} rps p99 {results[a + 'p99_ms']:7.2f} ms"
                f" | on {results[b + 'rps']:8.1f} rps p99 {results[b + 'p99_ms']:7.2f} ms"
                f" | x{results[b + 'rps'] / results[a + 'rps']:.2f}"
            )
    print()


if __name__ == "__main__":
    main()
