"""``python -m xds_control``: the ADS server fed by an etcd watch."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal

import aetcd
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos.topology.keys import DEFAULT_PREFIX, Keys
from tracing.collector_watch import CollectorWatch
from tracing.provider import setup_tracing
from tracing.settings import InvalidEndpoint, TracingSettings, parse_endpoint, with_ca_file
from xds_control.controller import Controller, Translator
from xds_control.convergence import ConvergenceTracker
from xds_control.etcd_watch import (
    OWN_CONNECTION_OPTIONS,
    WATCH_TIMEOUT_S,
    EtcdTopologyWatch,
)
from xds_control.metrics import MetricsCallbacks, XdsMetrics
from xds_control.observers import FanOutCallbacks, ObservedNodes
from xds_control.push_spans import PushSpans
from xds_control.resources.request_limits import DEFAULT_MAX_REQUEST_BYTES
from xds_control.server import AdsServer, StreamCallbacks
from xds_control.snapshot import SnapshotCache
from xds_control.status import ProxyStatusWriter
from xds_control.tracing_config import EnvoyTracing
from xds_control.translate import snapshot_for

log = logging.getLogger("xds_control")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m xds_control", description=__doc__)
    parser.add_argument("--etcd", default="127.0.0.1:2379", help="etcd client endpoint HOST:PORT")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="etcd key prefix of the desired state")
    parser.add_argument("--host", default="127.0.0.1", help="address the ADS server binds")
    parser.add_argument("--port", type=int, default=18000, help="ADS gRPC port")
    parser.add_argument("--quiet-ms", type=float, default=30, help="debounce: quiet period after an etcd event")
    parser.add_argument("--max-delay-ms", type=float, default=300, help="debounce: longest delay of a push")
    parser.add_argument(
        "--etcd-watch-timeout",
        type=float,
        default=WATCH_TIMEOUT_S,
        help="seconds without any answer on the etcd watch (a progress notification is asked for every third of "
        "it) after which the watch is taken for dead and started again on a new connection",
    )
    parser.add_argument("--metrics-host", default="127.0.0.1", help="address of the Prometheus /metrics endpoint")
    parser.add_argument("--metrics-port", type=int, default=0, help="port of /metrics (0: not served)")
    parser.add_argument(
        "--max-request-mb",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES // 2**20,
        help="largest request body (MiB) the ingress and sidecars take; 413 / RESOURCE_EXHAUSTED beyond it",
    )
    parser.add_argument(
        "--otlp-endpoint",
        default=None,
        help="OTLP gRPC collector HOST:PORT every Envoy (and this process) sends spans to "
        "(default: $OTEL_EXPORTER_OTLP_ENDPOINT; none: tracing off)",
    )
    parser.add_argument(
        "--trace-sampling-percent",
        type=float,
        default=100.0,
        help="share of requests the ingress traces (sidecars and runtimes follow its decision)",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if args.max_request_mb < 1:
        parser.error("--max-request-mb must be at least 1")
    if not 0 <= args.trace_sampling_percent <= 100:
        parser.error("--trace-sampling-percent must be between 0 and 100")
    try:
        args.tracing = envoy_tracing(args.otlp_endpoint, args.trace_sampling_percent)
    except InvalidEndpoint as exc:
        parser.error(f"--otlp-endpoint: {exc}")
    return args


def envoy_tracing(endpoint: str | None, sampling_percent: float) -> EnvoyTracing | None:
    """The Envoys' tracing: to ``endpoint``, else to the collector of the OTEL_* variables, else none. Either way
    ``OTEL_EXPORTER_OTLP_CERTIFICATE`` names the CAs of a TLS collector (default: the system's)."""
    if endpoint:
        given = with_ca_file(parse_endpoint(endpoint), os.environ)
        return EnvoyTracing(given, sampling_percent)
    collector = TracingSettings.from_environ().collector
    return EnvoyTracing(collector, sampling_percent) if collector is not None else None


async def serve(
    args: argparse.Namespace, push_spans: PushSpans | None = None, translate: Translator = snapshot_for
) -> None:
    """Run the ADS server and the etcd watch until SIGTERM or SIGINT; ``push_spans`` traces the pushes.

    ``translate`` builds each node's snapshot (the Controller's seam; tests inject resources Envoy refuses).
    """
    host, _, port = args.etcd.rpartition(":")
    # The proxy status writer's: it reconnects it after a failed write.
    client = aetcd.Client(host=host or "127.0.0.1", port=int(port), options=OWN_CONNECTION_OPTIONS)
    await client.connect()
    cache = SnapshotCache()
    keys = Keys(args.prefix)
    metrics = XdsMetrics()
    convergence = ConvergenceTracker(metrics)
    status = ProxyStatusWriter(client, keys)
    await status.start()
    controller = Controller(
        cache,
        metrics,
        convergence,
        max_request_bytes=args.max_request_mb * 2**20,
        tracing=args.tracing,
        push_spans=push_spans,
        translate=translate,
    )
    nodes = ObservedNodes(controller, metrics, status)
    loop = asyncio.get_running_loop()
    collector_watch: CollectorWatch | None = None
    if args.tracing is not None:
        configured = args.tracing

        def collector_answers(reachable: bool) -> None:
            # From the watch's thread: the controller lives on the loop (closed once serve returns, while a last
            # probe may still be under way).
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(controller.set_tracing, configured if reachable else None)

        # Probing while the collector is up too: the Envoys export their spans, this process has no export of
        # theirs to fail, and without it a collector that went away would be traced to until a restart.
        collector_watch = CollectorWatch(configured.collector, collector_answers, probe_while_up=True).start()
    observers: list[StreamCallbacks] = [MetricsCallbacks(metrics), convergence, status]
    if push_spans is not None:
        observers.append(push_spans)
    callbacks = FanOutCallbacks(observers)
    if args.metrics_port:
        metrics.serve(args.metrics_host, args.metrics_port)
    server = grpc.aio.server(
        # No SO_REUSEPORT: a port another process bound already must fail here, not split connections with it.
        options=[("grpc.max_send_message_length", 256 * 1024 * 1024), ("grpc.so_reuseport", 0)]
    )
    server.add_generic_rpc_handlers((AdsServer(cache, nodes, callbacks).rpc_handler(),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    # A client of its own: the watch reconnects it when its stream goes silent.
    watch_client = aetcd.Client(host=host or "127.0.0.1", port=int(port), options=OWN_CONNECTION_OPTIONS)
    await watch_client.connect()
    watch = EtcdTopologyWatch(
        watch_client,
        keys,
        controller.apply,
        quiet=args.quiet_ms / 1000,
        max_delay=args.max_delay_ms / 1000,
        timeout=args.etcd_watch_timeout,
    )
    watch_task = asyncio.create_task(watch.run())
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("xds_control serving ADS on %s:%d, etcd %s prefix %s", args.host, bound, args.etcd, args.prefix)
    if args.tracing is not None:
        log.info("Envoys trace %g%% of requests to %s", args.tracing.sampling_percent, args.tracing.collector)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("xds_control stopping")
    if collector_watch is not None:
        collector_watch.stop()
    watch_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watch_task
    await server.stop(grace=1.0)
    if push_spans is not None:
        push_spans.close()
    await status.stop()
    await watch_client.close()
    await client.close()


def main(argv: list[str] | None = None, translate: Translator = snapshot_for) -> None:
    """Parse ``argv`` and serve until stopped; ``translate`` as in ``serve``."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    environ = dict(os.environ)
    if args.tracing is not None:
        environ.setdefault("OTEL_EXPORTER_OTLP_ENDPOINT", args.tracing.collector.url)
    tracing = setup_tracing("xds_control", environ=environ)
    # Built only when spans can be exported: with tracing off a push costs no tracing work at all.
    push_spans = PushSpans() if tracing.configured else None
    try:
        asyncio.run(serve(args, push_spans, translate))
    finally:
        tracing.shutdown()


if __name__ == "__main__":
    main()
