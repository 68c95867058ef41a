"""How fast the manager answers, and how long from `model push` to the first answer through the ingress.

Part 1: a real etcd and one `python -m manager_api` process (no deployer, admin token, access log on as in
`hydro up`), seeded with iris versions, their deployments and applications. wrk with CLIENTS connections reads
(GET models, deployments, applications in turn) and then writes (deployment scales and application PUTs in turn,
spread over the seeded records) for a fixed time; then each endpoint alone, for the breakdown, the writes on one
record (every client on one key: the store's compare-and-swap under contention; 503s count as errors).

Part 2: the whole `hydro up` stack on free ports (etcd, xds_control, manager with the process deployer, ingress
Envoy). Each round pushes examples/iris as a new model (packed and uploaded through the API), deploys it with one
replica, routes a new application to it and polls the ingress until it answers; the figure is the median round.

    python benchmarks/manager_api.py [--quick] [--clients 50] [--seconds 15] [--pushes 5] [--profile]

--profile runs part 1's manager under cProfile and prints where its main thread spent the time.
The last line printed is a JSON object of the figures.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.project import enter_project_venv, write_iris_model

enter_project_venv()

import httpx  # noqa: E402

from manager_api.auth import write_token_file  # noqa: E402
from manager_api.client import ManagerClient  # noqa: E402
from manager_api.demo import DEMO_LABELS, demo_request  # noqa: E402
from manager_api.etcd_server import EtcdServer  # noqa: E402
from manager_api.ports import free_port  # noqa: E402
from manager_api.processes import ChildProcess, http_ok, wait_until  # noqa: E402
from manager_api.stack import Stack, StackConfig  # noqa: E402

TOKEN = "bench-admin-token"
MODEL = "iris"
#: Applications in the seed: list and read load sees more than one record.
SEED_APPLICATIONS = 10


#: `python -c` program running the manager under cProfile: `python -m cProfile` writes nothing, because uvicorn
#: re-raises the SIGTERM it handled once it has shut down, which kills the process before the profile is saved.
PROFILED_MANAGER = """
import cProfile, signal, sys
from manager_api.__main__ import main

def _exit(signum, frame):
    raise SystemExit(0)

signal.signal(signal.SIGTERM, _exit)
profiler = cProfile.Profile()
try:
    profiler.runcall(main, sys.argv[3:])
finally:
    profiler.dump_stats(sys.argv[1])
"""


@dataclass(frozen=True)
class Call:
    """One request wrk sends: method, path under the manager, JSON body or None."""

    method: str
    path: str
    body: dict[str, Any] | None = None


def need(tool: str) -> str:
    found = shutil.which(tool)
    if not found:
        sys.exit(f"{tool} is not installed: run `make bench-deps` first")
    return found


def _lua(calls: list[Call]) -> str:
    """A wrk script sending ``calls`` in turn on each thread, with the admin token."""
    entries = []
    for call in calls:
        body = "nil" if call.body is None else "[==[" + json.dumps(call.body) + "]==]"
        entries.append(f'  {{"{call.method}", "{call.path}", {body}}}')
    return (
        "local calls = {\n" + ",\n".join(entries) + "\n}\n"
        f'local headers = {{["Authorization"] = "Bearer {TOKEN}", ["Content-Type"] = "application/json"}}\n'
        "local n = 0\n"
        "request = function()\n"
        "  n = n + 1\n"
        "  local call = calls[(n % #calls) + 1]\n"
        "  return wrk.format(call[1], call[2], headers, call[3])\n"
        "end\n"
    )


def run_wrk(url: str, calls: list[Call], clients: int, seconds: float) -> dict[str, float]:
    """Closed-loop load with wrk: ``clients`` connections, each sending the next call as soon as one returns."""
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(_lua(calls))
    cmd = [need("wrk"), "-t", "2", "-c", str(clients), "-d", f"{max(1, round(seconds))}s"]
    cmd += ["--timeout", "30s", "--latency", "-s", str(script), url]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    finally:
        script.unlink()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    percentiles = {p: _ms(v, u) for p, v, u in re.findall(r"\s+(50|90|99)%\s+([\d.]+)(us|ms|s)", out)}
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(non_2xx.group(1)) if non_2xx else 0
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    return {
        "rps": rps,
        "p50_ms": percentiles.get("50", 0.0),
        "p90_ms": percentiles.get("90", 0.0),
        "p99_ms": percentiles.get("99", 0.0),
        "errors": float(errors),
    }


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def trained_iris(work: Path) -> Path:
    """A copy of examples/iris with its model trained here (nothing is downloaded)."""
    folder = work / "iris"
    folder.mkdir()
    write_iris_model(folder)
    return folder


def seed(api: ManagerClient, iris: Path, versions: int) -> None:
    """``versions`` iris versions, each deployed with 0 replicas (no deployer runs), and a few applications."""
    for _ in range(versions):
        version = int(api.push_model(MODEL, iris)["version"])
        api.deploy(MODEL, version, 0)
    for index in range(SEED_APPLICATIONS):
        api.put_application(f"app-{index}", [(MODEL, 1, 50), (MODEL, versions, 50)])


def manager_load(args: argparse.Namespace, work: Path, iris: Path, seconds: float) -> dict[str, Any]:
    """Part 1: read and write latency of one manager process under ``args.clients`` connections."""
    etcd = EtcdServer(work / "etcd").start()
    tokens = work / "tokens.json"
    write_token_file(tokens, {"bench": ("admin", TOKEN)})
    port = free_port()
    profile = work / "manager.prof"
    options = ["--etcd", etcd.endpoint, "--prefix", "/bench/", "--port", str(port)]
    options += ["--data-dir", str(work / "manager"), "--tokens", str(tokens)]
    command = [sys.executable, "-c", PROFILED_MANAGER, str(profile)] if args.profile else [sys.executable, "-m"]
    manager = ChildProcess("manager_api", [*command, "manager_api", *options], log_path=work / "manager.log")
    url = f"http://127.0.0.1:{port}"
    results: dict[str, Any] = {}
    try:
        manager.start().wait_ready(lambda: http_ok(f"{url}/healthz"), 60)
        with ManagerClient(url, TOKEN) as api:
            seed(api, iris, args.versions)
        reads = [Call("GET", f"/api/v1/{kind}") for kind in ("models", "deployments", "applications")]
        # The mixed write run spreads over the seeded records (a few writers per key, as in real use); the
        # *_one_key runs put every client on one record, the worst case for the store's compare-and-swap.
        writes = []
        for index in range(SEED_APPLICATIONS):
            version = index % args.versions + 1
            writes.append(Call("PUT", f"/api/v1/deployments/{MODEL}/{version}", {"replicas": index % 2}))
            writes.append(Call("PUT", f"/api/v1/applications/app-{index}", _one_variant(version)))
        runs = {
            "read": reads,
            "write": writes,
            "get_models": reads[:1],
            "get_deployments": reads[1:2],
            "get_applications": reads[2:],
            "get_model_version": [Call("GET", f"/api/v1/models/{MODEL}/versions/1")],
            "put_deployment_one_key": [Call("PUT", f"/api/v1/deployments/{MODEL}/1", {"replicas": n}) for n in (1, 0)],
            "put_application_one_key": [
                Call("PUT", "/api/v1/applications/app-0", _one_variant(v)) for v in (1, args.versions)
            ],
        }
        for name, calls in runs.items():
            result = run_wrk(url, calls, args.clients, seconds if name in ("read", "write") else seconds / 2)
            for key, value in result.items():
                results[f"{name}_{key}"] = round(value, 3)
            print(
                f"{name:18s} rps={result['rps']:8.1f} p50={result['p50_ms']:8.2f} ms "
                f"p90={result['p90_ms']:8.2f} ms p99={result['p99_ms']:8.2f} ms errors={int(result['errors'])}",
                flush=True,
            )
    finally:
        manager.stop()
        etcd.stop()
    if args.profile and profile.exists():
        print_profile(profile)
    return results


def _one_variant(version: int) -> dict[str, Any]:
    return {"stages": [{"variants": [{"model": MODEL, "version": version, "weight": 100}]}]}


def print_profile(path: Path) -> None:
    """The manager's hottest functions (own time) and its slowest call paths (cumulative time)."""
    for order, limit in (("tottime", 20), ("cumulative", 30)):
        text = io.StringIO()
        pstats.Stats(str(path), stream=text).sort_stats(order).print_stats(limit)
        print(f"--- manager_api profile, by {order} ---")
        print(text.getvalue().split("\n", 6)[-1].rstrip())


def push_to_inference(work: Path, iris: Path, rounds: int) -> dict[str, Any]:
    """Part 2: push + deploy + route on the `hydro up` stack, timed to the first correct answer at the ingress."""
    stack = Stack(
        StackConfig(data_dir=work / "stack", ingress_port=0, api_port=0, xds_port=0, xds_metrics_port=0, etcd_port=0)
    )
    phases: dict[str, list[float]] = {"push_s": [], "deploy_and_route_s": [], "until_answer_s": [], "total_s": []}
    try:
        stack.start()
        with ManagerClient(stack.api_url, stack.credentials.token) as api:
            for index in range(rounds):
                model, app = f"iris-{index}", f"bench-{index}"
                started = time.perf_counter()
                version = int(api.push_model(model, iris)["version"])
                pushed = time.perf_counter()
                api.deploy(model, version, 1)
                api.put_application(app, [(model, version, 100)])
                routed = time.perf_counter()
                wait_until(functools.partial(_answers, stack.ingress_url, app), 120, f"application {app}", 0.02)
                answered = time.perf_counter()
                for key, value in (
                    ("push_s", pushed - started),
                    ("deploy_and_route_s", routed - pushed),
                    ("until_answer_s", answered - routed),
                    ("total_s", answered - started),
                ):
                    phases[key].append(value)
                print(
                    f"push round {index + 1}: total {answered - started:6.2f} s "
                    f"(upload+register {pushed - started:5.2f} s, deploy+route {routed - pushed:5.2f} s, "
                    f"until the ingress answered {answered - routed:5.2f} s)",
                    flush=True,
                )
                # The next round starts from one running replica, not a growing crowd.
                api.delete_application(app)
                api.delete_deployment(model, version)
    finally:
        stack.stop()
    results: dict[str, Any] = {f"push_{key}_median": round(statistics.median(v), 3) for key, v in phases.items()}
    results["push_to_first_inference_s"] = results.pop("push_total_s_median")
    results["push_rounds"] = rounds
    return results


def _answers(ingress_url: str, app: str) -> bool:
    response = httpx.post(f"{ingress_url}/v2/models/{app}/infer", json=demo_request(), timeout=5.0)
    if response.status_code != 200:
        return False
    outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
    return [int(x) for x in outputs["label"]] == DEMO_LABELS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs (finishes within 3 minutes)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent connections of the load generator")
    parser.add_argument("--seconds", type=float, default=15.0, help="duration of the mixed read and write runs")
    parser.add_argument("--pushes", type=int, default=5, help="push-to-inference rounds (median reported)")
    parser.add_argument("--versions", type=int, default=3, help="iris versions seeded for the read/write load")
    parser.add_argument("--profile", action="store_true", help="profile the manager of part 1 with cProfile")
    args = parser.parse_args()
    seconds = 6.0 if args.quick else args.seconds
    pushes = 3 if args.quick else args.pushes
    need("wrk")

    work = Path(tempfile.mkdtemp(prefix="hydro-bench-manager-"))
    results: dict[str, Any] = {"clients": args.clients, "seconds": seconds, "load_average_1m": os.getloadavg()[0]}
    try:
        iris = trained_iris(work)
        results.update(manager_load(args, work, iris, seconds))
        results.update(push_to_inference(work, iris, pushes))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    main()
