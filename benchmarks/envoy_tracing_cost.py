"""What Envoy's OpenTelemetry tracer costs one proxy per request, feature by feature.

tracing_overhead.py measures a whole mesh in a closed loop, where every process's cost moves the others' (fewer
requests per wake-up cost more each). This one isolates the proxy: one Envoy per configuration, each with the
HTTP listener xds_control builds for the ingress (xds_control.resources.listeners.http_listener, the tracing block
from xds_control.tracing_config), routing every request to one upstream Envoy that answers it directly. Each is
loaded at the same fixed request rate (h2load over HTTP/1.1, like REST through the ingress), so per-request CPU is
compared at equal wake-up rates; it is read from /proc/PID/stat. Configurations:

- ``off``: no tracing;
- ``sampled_out``: tracing configured, 0 % sampled (what a sidecar does for a request its caller did not sample,
  and what every Envoy does for the unsampled share at a low sampling percentage);
- ``server_span``: every request sampled, its server span only (what a sidecar makes);
- ``ingress``: every request sampled, server span and a span per upstream attempt (the ingress as configured);
- ``ingress_no_collector``: the same with the collector address not listening (export fails, spans still made).

The collector is a span-counting OTLP receiver in this process (tracing_overhead.CountingReceiver); its CPU is
not counted. Rounds run every configuration once, figures are medians over rounds.

    python benchmarks/envoy_tracing_cost.py [--quick] [--rate 1200] [--seconds 8] [--rounds 6]

The last line printed is a JSON object: ``{name}_cpu_us_per_request`` for each configuration and the differences
``sampled_out_us`` (tracing configured, request not sampled), ``server_span_us`` (a sampled server span on top of
that), ``attempt_span_us`` (the upstream attempt span on top of that) and ``export_us`` (ingress against
ingress_no_collector: what sending the spans costs).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.project import enter_project_venv

enter_project_venv()

from envoy.config.route.v3 import route_components_pb2  # noqa: E402
from google.protobuf.message import Message  # noqa: E402

from benchmarks.h2load import need  # noqa: E402
from benchmarks.loop_thread import LoopThread  # noqa: E402
from benchmarks.static_envoy import static_bootstrap  # noqa: E402
from benchmarks.tracing_overhead import CountingReceiver, cpu_seconds, serve_receiver  # noqa: E402
from manager_api.ports import free_port  # noqa: E402
from manager_api.processes import ChildProcess  # noqa: E402
from xds_control.bootstrap import envoy_process, envoy_ready  # noqa: E402
from xds_control.resources.clusters import static_cluster  # noqa: E402
from xds_control.resources.listeners import http_listener  # noqa: E402
from xds_control.resources.routes import direct_route, route_configuration  # noqa: E402
from xds_control.tracing_config import (  # noqa: E402
    INGRESS_SERVICE,
    EnvoyTracing,
    ManagerHook,
    ingress_response_headers,
    tracing_hook,
)

CONFIGS = ("off", "sampled_out", "server_span", "ingress", "ingress_no_collector")
#: An OIP REST body like the iris row tracing_overhead sends (the upstream ignores it).
BODY = '{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP64","data":[5.1,3.5,1.4,0.2]}]}'
CONCURRENCY = 16


def without_attempt_spans(hook: ManagerHook) -> ManagerHook:
    """The ingress's tracing with its server span only (as a sidecar traces)."""

    def configure(manager: Any) -> None:
        hook(manager)
        manager.tracing.spawn_upstream_span.value = False

    return configure


def as_configured(hook: ManagerHook) -> ManagerHook:
    """The tracing as xds_control configures it."""
    return hook


def front_envoy(
    name: str, work: Path, upstream_port: int, tracing: EnvoyTracing | None, amend: Callable[[ManagerHook], ManagerHook]
) -> tuple[ChildProcess, int, int]:
    """One proxy configuration: its process, listen port and admin port (started, not yet ready)."""
    listen_port, admin_port = free_port(), free_port()
    route = route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix="/"), route=route_components_pb2.RouteAction(cluster="upstream")
    )
    routes = route_configuration(name, [route], ingress_response_headers(tracing))
    hook = tracing_hook(tracing, INGRESS_SERVICE, ingress=True)
    listener = http_listener(
        name, "127.0.0.1", listen_port, route_config=routes, configure=amend(hook) if hook is not None else None
    )
    clusters: list[Message] = [static_cluster("upstream", "127.0.0.1", upstream_port, http2=True)]
    if tracing is not None:
        clusters.append(tracing.collector_cluster())
    process = envoy_process(name, static_bootstrap(listener, clusters, admin_port), work, admin_port, "error")
    return process.start(), listen_port, admin_port


def load(port: int, rate: int, seconds: float, body: Path) -> int:
    """``rate`` requests a second over HTTP/1.1 for ``seconds``; the number answered with 2xx."""
    per_client = max(1, round(rate / CONCURRENCY))
    cmd = [need("h2load"), "--h1", "-c", str(CONCURRENCY), "-t", "1", f"--rps={per_client}"]
    cmd += ["-D", f"{max(1, round(seconds))}s", "-d", str(body), "-H", "content-type: application/json"]
    cmd.append(f"http://127.0.0.1:{port}/v2/models/iris/infer")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    found = re.search(r"(\d+) succeeded", out)
    if found is None:
        sys.exit(f"unexpected h2load output:\n{out}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs (finishes well within 3 minutes)")
    parser.add_argument("--rate", type=int, default=1200, help="requests per second to each configuration")
    parser.add_argument("--seconds", type=float, default=8.0, help="load time per configuration and round")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    seconds = 4.0 if args.quick else args.seconds
    rounds = 5 if args.quick else args.rounds
    need("h2load")

    work = Path(tempfile.mkdtemp(prefix="hydro-envoy-tracing-"))
    body = work / "body.json"
    body.write_text(BODY)
    loop = LoopThread()
    receiver = CountingReceiver()
    server, receiver_port = loop.run(serve_receiver(receiver))
    live = EnvoyTracing.from_endpoint(f"127.0.0.1:{receiver_port}")
    dead = EnvoyTracing.from_endpoint(f"127.0.0.1:{free_port()}")  # nothing listens there
    variants: dict[str, tuple[EnvoyTracing | None, Callable[[ManagerHook], ManagerHook]]] = {
        "off": (None, as_configured),
        "sampled_out": (EnvoyTracing(live.collector, sampling_percent=0.0), as_configured),
        "server_span": (live, without_attempt_spans),
        "ingress": (live, as_configured),
        "ingress_no_collector": (dead, as_configured),
    }
    processes: list[ChildProcess] = []
    results: dict[str, Any] = {}
    try:
        upstream_port, upstream_admin = free_port(), free_port()
        answer = route_configuration("upstream", [direct_route("answer", "/", 200, '{"outputs":[]}')])
        answering = http_listener("upstream", "127.0.0.1", upstream_port, route_config=answer)
        upstream = envoy_process(
            "upstream", static_bootstrap(answering, [], upstream_admin), work, upstream_admin, "error"
        ).start()
        processes.append(upstream)
        fronts: dict[str, tuple[ChildProcess, int]] = {}
        for name, (tracing, amend) in variants.items():
            process, port, admin = front_envoy(name, work, upstream_port, tracing, amend)
            processes.append(process)
            process.wait_ready(functools.partial(envoy_ready, admin), 30)
            fronts[name] = (process, port)
        upstream.wait_ready(functools.partial(envoy_ready, upstream_admin), 30)
        per_request: dict[str, list[float]] = {name: [] for name in CONFIGS}
        for round_number in range(1, rounds + 1):
            shift = (round_number - 1) % len(CONFIGS)
            for name in CONFIGS[shift:] + CONFIGS[:shift]:
                process, port = fronts[name]
                assert process.pid is not None
                before = cpu_seconds(process.pid)
                answered = load(port, args.rate, seconds, body)
                used = cpu_seconds(process.pid) - before
                if answered == 0:
                    sys.exit(f"{name}: no request answered{process.log_tail()}")
                per_request[name].append(1e6 * used / answered)
                print(
                    f"round {round_number} {name:21s} {answered:6d} answered, "
                    f"{per_request[name][-1]:6.1f} us CPU per request",
                    flush=True,
                )
        medians = {name: statistics.median(values) for name, values in per_request.items()}
        for name, value in medians.items():
            results[f"{name}_cpu_us_per_request"] = round(value, 1)
        results["sampled_out_us"] = round(medians["sampled_out"] - medians["off"], 1)
        results["server_span_us"] = round(medians["server_span"] - medians["sampled_out"], 1)
        results["attempt_span_us"] = round(medians["ingress"] - medians["server_span"], 1)
        results["export_us"] = round(medians["ingress"] - medians["ingress_no_collector"], 1)
        results["spans_received"] = receiver.spans
        if not receiver.spans:
            sys.exit("the receiver got no span: the traced configurations did not export")
        results.update(rate=args.rate, seconds_per_config=seconds, rounds=rounds, concurrency=CONCURRENCY)
        results["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    finally:
        for process in processes:
            process.stop()
        loop.run(server.stop(0.5))
        loop.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    main()
