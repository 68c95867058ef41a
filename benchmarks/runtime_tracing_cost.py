"""What tracing costs a model runtime per REST request, apart from the Envoys around it.

tracing_overhead.py measures the whole mesh, where the runtime's share of tracing's cost is lost in the noise of
four processes; envoy_tracing_cost.py isolates the proxy. This one isolates the runtime: three iris runtimes (the
deployer's command line, no sidecar), one of them exporting spans to a span-counting OTLP receiver in this
process (tracing_overhead.CountingReceiver; its CPU is not counted). Each is sent what a sidecar sends it:
HTTP/1.1 POSTs with a ``traceparent`` and an ``x-request-id``, at a fixed rate (h2load ``--h1 --rps``, so every
runtime wakes up as often), and its CPU time per request is read from /proc/PID/stat.

On a shared machine CPU per request drifts by more than the effect, so every measurement is a pair run at the same
time, against the runtime without tracing (``off``), and the difference is taken within the pair:

- ``traced``: the tracing runtime, parent sampled (flag 01): a span per request, made, queued, encoded, exported;
- ``sampled_out``: the same runtime, parent not sampled (flag 00): the header parsed, no span;
- ``control``: a second runtime without tracing: what two identical runtimes differ by, the floor of the others.

    python benchmarks/runtime_tracing_cost.py [--quick] [--rate 1500] [--seconds 8] [--rounds 8]

The last line printed is a JSON object: ``traced_us``, ``sampled_out_us`` and ``control_us`` (medians over rounds of
the extra CPU microseconds per request against ``off`` in the same pair), ``{name}_cpu_us_per_request``, and
``spans_received``.
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.project import enter_project_venv, write_iris_model

enter_project_venv()
# Before gRPC is imported: this process forks the runtimes while its receiver's gRPC runs (protos/grpc_environment.py).
from protos.grpc_environment import apply_grpc_defaults  # noqa: E402

apply_grpc_defaults()

from benchmarks.h2load import need  # noqa: E402
from benchmarks.loop_thread import LoopThread  # noqa: E402
from benchmarks.tracing_overhead import CountingReceiver, cpu_seconds, serve_receiver  # noqa: E402
from manager_api.ports import free_port  # noqa: E402
from manager_api.processes import ChildProcess, http_ok  # noqa: E402

#: The iris row tracing_overhead sends.
BODY = '{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP64","data":[5.1,3.5,1.4,0.2]}]}'
CONCURRENCY = 16
TRACE_ID, PARENT_ID = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
#: configuration -> (runtime, traceparent flags)
PAIRED = {"traced": ("tracing", "01"), "sampled_out": ("tracing", "00"), "control": ("control", "01")}
#: A request id as Envoy writes one (a UUID): the span's hydro.request_id attribute.
REQUEST_ID = "7d8e1a52-3c1b-4c6e-9a57-1b2f3e4d5c6a"


def start_runtime(name: str, model_dir: Path, work: Path, otlp_endpoint: str | None) -> tuple[ChildProcess, int]:
    """An iris runtime, exporting spans to ``otlp_endpoint`` when given; the process and its HTTP port (ready)."""
    http_port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    if otlp_endpoint is not None:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp_endpoint
    argv = [sys.executable, "-m", "runtimes", "--model-dir", str(model_dir), "--name", "iris", "--version", "1"]
    argv += ["--host", "127.0.0.1", "--grpc-port", str(free_port()), "--http-port", str(http_port)]
    process = ChildProcess(f"runtime-{name}", argv, env=env, log_path=work / f"{name}.log").start()
    process.wait_ready(lambda: http_ok(f"http://127.0.0.1:{http_port}/v2/health/ready"), 60)
    return process, http_port


def load(port: int, flags: str, rate: int, seconds: float, body: Path) -> subprocess.Popen[str]:
    """h2load over HTTP/1.1 at ``rate`` requests a second for ``seconds``, started (not waited for)."""
    per_client = max(1, round(rate / CONCURRENCY))
    cmd = [need("h2load"), "--h1", "-c", str(CONCURRENCY), "-t", "1", f"--rps={per_client}"]
    cmd += ["-D", f"{max(1, round(seconds))}s", "-d", str(body), "-H", "content-type: application/json"]
    cmd += ["-H", f"traceparent: 00-{TRACE_ID}-{PARENT_ID}-{flags}", "-H", f"x-request-id: {REQUEST_ID}"]
    cmd.append(f"http://127.0.0.1:{port}/v2/models/iris/infer")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def succeeded(h2load: subprocess.Popen[str], what: str) -> int:
    """The requests h2load got a 2xx for; exits naming ``what`` when it failed or none did."""
    out, err = h2load.communicate()
    found = re.search(r"(\d+) succeeded", out)
    if h2load.returncode != 0 or found is None or int(found.group(1)) == 0:
        sys.exit(f"{what}: h2load failed or nothing succeeded:\n{out}{err}")
    return int(found.group(1))


def paired_round(
    runtimes: dict[str, tuple[ChildProcess, int]], name: str, rate: int, seconds: float, body: Path
) -> tuple[float, float]:
    """``off`` and configuration ``name`` loaded at the same time: the CPU microseconds per request of each."""
    target, flags = PAIRED[name]
    started = {}
    for runtime, flag in (("off", "01"), (target, flags)):
        process, port = runtimes[runtime]
        assert process.pid is not None
        started[runtime] = (process.pid, cpu_seconds(process.pid), load(port, flag, rate, seconds, body))
    per_request = {}
    for runtime, (pid, before, h2load) in started.items():
        answered = succeeded(h2load, runtime)
        per_request[runtime] = 1e6 * (cpu_seconds(pid) - before) / answered
    return per_request["off"], per_request[target]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs (finishes well within 3 minutes)")
    parser.add_argument("--rate", type=int, default=1500, help="requests per second to each runtime of a pair")
    parser.add_argument("--seconds", type=float, default=8.0, help="load time per pair")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of the three pairs")
    args = parser.parse_args()
    seconds = 4.0 if args.quick else args.seconds
    rounds = 6 if args.quick else args.rounds
    need("h2load")

    work = Path(tempfile.mkdtemp(prefix="hydro-runtime-tracing-"))
    body = work / "body.json"
    body.write_text(BODY)
    model_dir = work / "model"
    model_dir.mkdir()
    write_iris_model(model_dir)
    loop = LoopThread()
    receiver = CountingReceiver()
    server, receiver_port = loop.run(serve_receiver(receiver))
    runtimes: dict[str, tuple[ChildProcess, int]] = {}
    results: dict[str, Any] = {}
    try:
        for name, endpoint in (("off", None), ("tracing", f"http://127.0.0.1:{receiver_port}"), ("control", None)):
            runtimes[name] = start_runtime(name, model_dir, work, endpoint)
        extra: dict[str, list[float]] = {name: [] for name in PAIRED}
        cpu: dict[str, list[float]] = {name: [] for name in ("off", *PAIRED)}
        for round_number in range(1, rounds + 1):
            shift = (round_number - 1) % len(PAIRED)
            names = list(PAIRED)
            for name in names[shift:] + names[:shift]:
                off, other = paired_round(runtimes, name, args.rate, seconds, body)
                cpu["off"].append(off)
                cpu[name].append(other)
                extra[name].append(other - off)
                print(
                    f"round {round_number} {name:12s} {other:6.1f} us CPU per request, off {off:6.1f}: "
                    f"{other - off:+6.1f}",
                    flush=True,
                )
        if not receiver.spans:
            sys.exit("the receiver got no span: the tracing runtime did not export")
        for name, values in extra.items():
            results[f"{name}_us"] = round(statistics.median(values), 1)
        for name, values in cpu.items():
            results[f"{name}_cpu_us_per_request"] = round(statistics.median(values), 1)
        results["spans_received"] = receiver.spans
        results.update(rate=args.rate, seconds_per_pair=seconds, rounds=rounds, concurrency=CONCURRENCY)
        results["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    finally:
        for process, _ in runtimes.values():
            process.stop()
        loop.run(server.stop(0.5))
        loop.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    main()
