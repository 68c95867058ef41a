"""What a pipeline hop costs: a 3-stage pipeline of identity models vs the sum of three direct calls to them.

A real `hydro up` stack on free ports (etcd, xds_control, manager API, ingress Envoy, the deployer). Three
identity models (python runtime, one FP32 [1, 4] tensor ``x`` in and out) get one replica each. Through the
ingress, in the same run and at the same concurrency:

- ``pipeline``: the application ``bench-pipe`` whose three stages are the three models (ingress -> pipeline
  sidecar -> pipeline runtime -> outbound listener -> each stage's sidecar -> runtime);
- ``direct_1..3``: one-stage applications ``bench-direct-{i}``, each routed by the ingress straight to one model
  (no pipeline hop).

Load is gRPC from h2load with a pre-encoded ModelInferRequest (raw contents), per-request log for percentiles.
Rounds interleave the four targets; figures are medians of rounds. Added latency per stage =
(pipeline - (direct_1 + direct_2 + direct_3)) / 3, for p50 and p99. On a shared machine these latencies at a
fixed concurrency mostly measure how much CPU is left; so after the rounds a fixed number of requests is sent to
each target and the CPU time of every process on the data path is reported per request: the pipeline runtime and
its sidecar (``pipeline_runtime_cpu_us_per_request``, ``pipeline_sidecar_cpu_us_per_request``), the stages'
runtimes and sidecars and the ingress, per pipeline request and per three direct requests
(``stages_cpu_us_per_pipeline_request`` / ``stages_cpu_us_per_3_direct_requests``, ``ingress_...``,
``mesh_...``: all of them). That moves less with load elsewhere than latency does, but still with throughput (fewer
requests per wake-up cost more each: measured here 1,170 us at 170 rps, 2,400 us at 50 rps): compare figures of
runs at similar throughput.

    python benchmarks/pipeline_overhead.py [--quick] [--concurrency 16] [--seconds 10] [--rounds 3]

The last line printed is a JSON object of the figures (keys include per_stage_p50_ms and per_stage_p99_ms).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.project import enter_project_venv

enter_project_venv()
# Before gRPC is imported: this process forks children while gRPC runs, and its gRPC calls should cost what the
# mesh's own processes' do (protos/grpc_environment.py).
from protos.grpc_environment import apply_grpc_defaults  # noqa: E402

apply_grpc_defaults()

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import h2load  # noqa: E402
from benchmarks.h2load import need, run_h2load  # noqa: E402
from manager_api.client import ManagerClient  # noqa: E402
from manager_api.credentials import load_credentials  # noqa: E402
from manager_api.ports import free_port  # noqa: E402
from manager_api.processes import ChildProcess, http_ok, wait_until  # noqa: E402
from protos import inference_pb2, inference_pb2_grpc  # noqa: E402

STAGES = 3
PIPELINE = "bench-pipe"
ROW = [5.1, 3.5, 1.4, 0.2]

IDENTITY_YAML = """\
runtime: python
files: [model.py]
entrypoint: model:Identity
signature:
  inputs:
    - {name: x, datatype: FP32, shape: [-1, 4]}
  outputs:
    - {name: x, datatype: FP32, shape: [-1, 4]}
"""

IDENTITY_PY = '''\
"""An identity model: x in, x out."""


class Identity:
    def load(self):
        pass

    def predict(self, inputs):
        return {"x": inputs["x"]}
'''


def model_name(stage: int) -> str:
    return f"bench-identity-{stage}"


def direct_app(stage: int) -> str:
    return f"bench-direct-{stage}"


def request(app: str) -> inference_pb2.ModelInferRequest:
    message = inference_pb2.ModelInferRequest(model_name=app)
    message.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    message.raw_input_contents.append(np.asarray([ROW], dtype="<f4").tobytes())
    return message


def grpc_frame(app: str) -> bytes:
    """One length-prefixed gRPC message naming ``app`` (the ingress routes on the model name)."""
    return h2load.grpc_frame(request(app))


def check_grpc(target: str, app: str) -> None:
    """One request before the load: h2load counts HTTP 200s, and a gRPC error is an HTTP 200 too."""
    with grpc.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request(app), timeout=10)
    names = [o.name for o in response.outputs]
    x = np.frombuffer(response.raw_output_contents[names.index("x")], dtype="<f4")
    if not np.allclose(x, ROW):
        sys.exit(f"{app} answered x={x.tolist()}, expected {ROW}")


def answers(target: str, app: str) -> bool:
    try:
        check_grpc(target, app)
    except grpc.RpcError:
        return False
    return True


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    # Fields 14 and 15 of /proc/PID/stat; split after the command name, which may contain spaces.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mesh_processes(data_dir: Path) -> dict[str, int]:
    """The pids of the data path's processes by role: ``ingress``, ``pipeline_runtime``, ``pipeline_sidecar``,
    ``stage{i}_runtime`` and ``stage{i}_sidecar`` (the model sidecar's bootstrap names its model version)."""
    found = subprocess.run(["pgrep", "-f", str(data_dir)], capture_output=True, text=True).stdout.split()
    roles: dict[str, int] = {}
    stage_of = {model_name(stage): stage for stage in range(1, STAGES + 1)}
    for pid in map(int, found):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
        except FileNotFoundError:
            continue
        role = None
        if "runtimes.pipeline" in argv:
            role = "pipeline_runtime"
        elif "runtimes" in argv and "--name" in argv:
            stage = stage_of.get(argv[argv.index("--name") + 1])
            role = f"stage{stage}_runtime" if stage else None
        elif Path(argv[0]).name == "envoy" and "-c" in argv:
            config = Path(argv[argv.index("-c") + 1])
            if config.name == "ingress.yaml":
                role = "ingress"
            elif config.name.startswith("pipeline-sidecar"):
                role = "pipeline_sidecar"
            elif (match := re.search(r"sidecar~([^~]+)~", config.read_text())) and match.group(1) in stage_of:
                role = f"stage{stage_of[match.group(1)]}_sidecar"
        if role is not None:
            if role in roles:
                sys.exit(f"two {role} processes: {roles[role]} and {pid}")
            roles[role] = pid
    wanted = {"ingress", "pipeline_runtime", "pipeline_sidecar"}
    wanted |= {f"stage{i}_{kind}" for i in range(1, STAGES + 1) for kind in ("runtime", "sidecar")}
    if set(roles) != wanted:
        sys.exit(f"mesh processes not found: {sorted(wanted - set(roles))}")
    return roles


def cpu_per_request(
    ingress: str, frame: Path, concurrency: int, requests: int, pids: dict[str, int]
) -> dict[str, float]:
    """CPU microseconds per request of each process in ``pids``, over exactly ``requests`` calls of ``frame``.

    It moves less than latency with what else the machine runs, but grows as the throughput falls.
    """
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    result = run_h2load(ingress, frame, concurrency, 0, requests=requests)
    used = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    if result["errors"]:
        sys.exit(f"{int(result['errors'])} of the {requests} requests of the CPU measurement failed")
    return {name: seconds * 1e6 / requests for name, seconds in used.items()}


def cpu_figures(
    ingress: str, frames: dict[str, Path], concurrency: int, requests: int, pids: dict[str, int]
) -> dict[str, float]:
    """Where the CPU of a pipeline request goes, against three direct requests (one per stage), each load
    ``requests`` calls long. ``pipeline_runtime`` / ``pipeline_sidecar``: the pipeline hop itself; ``stages``:
    the stages' runtimes and sidecars (per pipeline request, and summed over the three direct requests);
    ``ingress``; ``mesh``: all of them."""
    pipeline = cpu_per_request(ingress, frames["pipeline"], concurrency, requests, pids)
    direct = {
        stage: cpu_per_request(ingress, frames[f"direct_{stage}"], concurrency, requests, pids)
        for stage in range(1, STAGES + 1)
    }
    stage_roles = [f"stage{i}_{kind}" for i in range(1, STAGES + 1) for kind in ("runtime", "sidecar")]
    own = {stage: [f"stage{stage}_runtime", f"stage{stage}_sidecar", "ingress"] for stage in direct}
    figures = {
        "pipeline_runtime_cpu_us_per_request": pipeline["pipeline_runtime"],
        "pipeline_sidecar_cpu_us_per_request": pipeline["pipeline_sidecar"],
        "stages_cpu_us_per_pipeline_request": sum(pipeline[role] for role in stage_roles),
        "stages_cpu_us_per_3_direct_requests": sum(
            direct[stage][f"stage{stage}_{kind}"] for stage in direct for kind in ("runtime", "sidecar")
        ),
        "ingress_cpu_us_per_pipeline_request": pipeline["ingress"],
        "ingress_cpu_us_per_3_direct_requests": sum(direct[stage]["ingress"] for stage in direct),
        "mesh_cpu_us_per_pipeline_request": sum(pipeline.values()),
        # Only the processes each direct request goes through: the other stages' are idle then.
        "mesh_cpu_us_per_3_direct_requests": sum(direct[stage][role] for stage in direct for role in own[stage]),
    }
    return {name: round(value, 1) for name, value in figures.items()}


def write_models(work: Path) -> dict[int, Path]:
    folders = {}
    for stage in range(1, STAGES + 1):
        folder = work / "models" / model_name(stage)
        folder.mkdir(parents=True)
        (folder / "serving.yaml").write_text(IDENTITY_YAML)
        (folder / "model.py").write_text(IDENTITY_PY)
        folders[stage] = folder
    return folders


def setup(api: ManagerClient, folders: dict[int, Path]) -> None:
    """Push and deploy the three identity models; the pipeline and one one-stage application per model."""
    stages: list[dict[str, object]] = []
    for stage, folder in folders.items():
        version = int(api.push_model(model_name(stage), folder)["version"])
        api.deploy(model_name(stage), version, 1)
        api.put_application(direct_app(stage), [(model_name(stage), version, 100)])
        stages.append({"variants": [{"model": model_name(stage), "version": version, "weight": 100}]})
    api.put_application_stages(PIPELINE, stages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs (finishes well within 3 minutes)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0, help="measurement time per target and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are their medians")
    args = parser.parse_args()
    seconds = 4.0 if args.quick else args.seconds
    need("h2load")

    work = Path(tempfile.mkdtemp(prefix="hydro-bench-pipe-"))
    folders = write_models(work)
    ports = {name: free_port() for name in ("ingress", "api", "xds", "metrics", "etcd")}
    argv = [sys.executable, "-m", "manager_api.cli", "up", "--data-dir", str(work / "hydro")]
    for name, option in (
        ("ingress", "--ingress-port"),
        ("api", "--api-port"),
        ("xds", "--xds-port"),
        ("etcd", "--etcd-port"),
        ("metrics", "--xds-metrics-port"),
    ):
        argv += [option, str(ports[name])]
    stack = ChildProcess("hydro-up", argv, log_path=work / "hydro-up.log").start()
    ingress = f"127.0.0.1:{ports['ingress']}"
    targets = {"pipeline": PIPELINE, **{f"direct_{i}": direct_app(i) for i in range(1, STAGES + 1)}}
    results: dict[str, float] = {}
    try:
        stack.wait_ready(lambda: http_ok(f"http://{ingress}/v2/health/ready"), 120)
        credentials = load_credentials(work / "hydro")
        if credentials is None:
            sys.exit("hydro up wrote no credentials")
        with ManagerClient(f"http://127.0.0.1:{ports['api']}", credentials.token) as api:
            setup(api, folders)
        frames = {}
        for name, app in targets.items():
            wait_until(partial(answers, ingress, app), 180, f"{app} through the ingress", interval=0.25)
            frames[name] = work / f"{name}.grpc"
            frames[name].write_bytes(grpc_frame(app))
        # Rounds interleave the targets so that a noisy moment hits all of them; figures are medians of rounds.
        rounds: dict[str, list[float]] = {}
        for round_number in range(1, args.rounds + 1):
            for name in targets:
                result = run_h2load(ingress, frames[name], args.concurrency, seconds)
                for key, value in result.items():
                    rounds.setdefault(f"{name}_{key}", []).append(value)
                print(
                    f"round {round_number} {name:9s} rps={result['rps']:8.1f} p50={result['p50_ms']:7.2f} ms "
                    f"p99={result['p99_ms']:7.2f} ms errors={int(result['errors'])}",
                    flush=True,
                )
        for key, values in rounds.items():
            results[key] = round(sum(values) if key.endswith("errors") else statistics.median(values), 3)
        for pct in ("p50", "p99"):
            direct_sum = sum(results[f"direct_{i}_{pct}_ms"] for i in range(1, STAGES + 1))
            results[f"direct_sum_{pct}_ms"] = round(direct_sum, 3)
            results[f"per_stage_{pct}_ms"] = round((results[f"pipeline_{pct}_ms"] - direct_sum) / STAGES, 3)
        results["concurrency"] = args.concurrency
        results["seconds_per_target"] = seconds
        results["rounds"] = args.rounds
        cpu_requests = 1000 if args.quick else 5000
        pids = mesh_processes(work / "hydro")
        cpu = cpu_figures(ingress, frames, args.concurrency, cpu_requests, pids)
        results.update(cpu)
        results["cpu_requests"] = cpu_requests
        print(
            f"CPU over {cpu_requests} requests of each load: " + ", ".join(f"{k} {v:.0f} us" for k, v in cpu.items()),
            flush=True,
        )
    finally:
        stack.stop(grace=60)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"protocol": "grpc", **results}, sort_keys=True))


if __name__ == "__main__":
    main()
