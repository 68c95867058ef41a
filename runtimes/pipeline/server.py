"""The pipeline runtime process: one application served over gRPC and HTTP from one asyncio event loop.

Start-up: read and check the spec (exit 1 naming the problem), bind both ports, serve, report ready. Stage calls
go through the sidecar's outbound listener (``--outbound``), which the sidecar may only get from xds_control a
moment later: calls made before then fail as that stage being unavailable, nothing worse. SIGTERM or SIGINT:
report not ready, let in-flight requests finish for ``--shutdown-grace`` seconds, stop the shadow worker (which
cancels its calls), exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

import uvicorn
import uvloop
from prometheus_client import CollectorRegistry

from runtimes.pipeline.executor import PipelineExecutor
from runtimes.pipeline.grpc_service import create_grpc_server
from runtimes.pipeline.rest import create_app
from runtimes.pipeline.service import PipelineService
from runtimes.pipeline.shadow_worker import WorkerOptions
from runtimes.pipeline.shadows import ShadowMetrics, ShadowRunner
from runtimes.pipeline.spec import PipelineSpec, PipelineSpecError, load_spec
from runtimes.server import LOG_LEVELS, configure_logging, server_version
from tracing.provider import setup_tracing
from tracing.settings import InvalidEndpoint

log = logging.getLogger("runtimes.pipeline")


@dataclass(frozen=True)
class Options:
    """Command-line options of ``python -m runtimes.pipeline``."""

    spec: Path
    outbound: str
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    http_port: int = 8000
    timeout: float = 30.0
    shadow_timeout: float = 10.0
    max_shadows_in_flight: int = 32
    shadow_delay: float = WorkerOptions.delay
    max_message_mb: int = 64
    log_level: str = "info"
    shutdown_grace: float = 5.0


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Parse ``python -m runtimes.pipeline`` arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m runtimes.pipeline",
        description="Serve one application by calling its stages through the sidecar's outbound listener.",
    )
    parser.add_argument("--spec", type=Path, required=True, help="JSON: the application record and signatures")
    parser.add_argument("--outbound", required=True, help="HOST:PORT of the sidecar's outbound listener")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--grpc-port", type=int, required=True, help="gRPC port")
    parser.add_argument("--http-port", type=int, required=True, help="HTTP/JSON port")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds for the whole pipeline, split across stages (default 30)"
    )
    parser.add_argument("--shadow-timeout", type=float, default=10.0, help="seconds per shadow call (default 10)")
    parser.add_argument(
        "--max-shadows-in-flight",
        type=int,
        default=32,
        help="copies per shadow handed to the shadow worker and not yet reported; more are dropped and counted "
        "(default 32)",
    )
    parser.add_argument(
        "--shadow-delay",
        type=float,
        default=WorkerOptions.delay,
        help="seconds from the caller's answer to its shadow calls, so they do not compete with it on its way out "
        f"through the sidecar (default {WorkerOptions.delay})",
    )
    parser.add_argument("--max-message-mb", type=int, default=64, help="largest message in MiB (default 64)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    parser.add_argument("--shutdown-grace", type=float, default=5.0, help="seconds for in-flight requests (default 5)")
    args = parser.parse_args(argv)
    if args.timeout <= 0 or args.shadow_timeout <= 0:
        parser.error("--timeout and --shadow-timeout must be positive")
    if args.max_shadows_in_flight < 1:
        parser.error("--max-shadows-in-flight must be at least 1")
    if not 0 <= args.shadow_delay <= 10:
        parser.error("--shadow-delay must be between 0 and 10 seconds")
    if args.max_message_mb < 1:
        parser.error("--max-message-mb must be at least 1")
    host, _, port = args.outbound.rpartition(":")
    if not host or not port.isdigit():
        parser.error(f"--outbound must be HOST:PORT, not {args.outbound!r}")
    return Options(
        spec=args.spec,
        outbound=args.outbound,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        timeout=args.timeout,
        shadow_timeout=args.shadow_timeout,
        max_shadows_in_flight=args.max_shadows_in_flight,
        shadow_delay=args.shadow_delay,
        max_message_mb=args.max_message_mb,
        log_level=args.log_level,
        shutdown_grace=args.shutdown_grace,
    )


class _HttpServer(uvicorn.Server):
    """uvicorn without its own signal handlers: this process owns SIGTERM/SIGINT for both protocols."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def serve(options: Options, spec: PipelineSpec) -> int:
    """Run the pipeline until a signal; the process exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    max_bytes = options.max_message_mb * 2**20
    registry = CollectorRegistry()
    executor = PipelineExecutor(spec, options.outbound, timeout=options.timeout, max_message_bytes=max_bytes)
    shadows: ShadowRunner | None = None
    if any(plan.shadows for plan in spec.stages):
        # A process of its own makes the shadow calls: this event loop only hands them over (runtimes/pipeline/
        # shadows.py), and an application without shadows pays for no worker.
        command = WorkerOptions(
            spec.name, options.outbound, options.shadow_timeout, max_bytes, options.log_level, options.shadow_delay
        )
        shadows = ShadowRunner(command, ShadowMetrics(registry), max_in_flight=options.max_shadows_in_flight)
    service = PipelineService(spec, executor, registry, shadows)
    version = server_version()
    grpc_server, health = create_grpc_server(service, server_version=version, max_message_bytes=max_bytes)
    try:
        if grpc_server.add_insecure_port(f"{options.host}:{options.grpc_port}") == 0:
            raise OSError("the port is in use or the address is invalid")
        # Bound here, not by uvicorn, so that a port clash fails the start instead of a background task.
        http_socket = socket.create_server((options.host, options.http_port))
    except OSError as exc:
        log.critical(
            "cannot listen on %s (gRPC %d, HTTP %d): %s", options.host, options.grpc_port, options.http_port, exc
        )
        return 1
    http = _HttpServer(
        uvicorn.Config(
            create_app(service, server_version=version, max_body_bytes=max_bytes),
            lifespan="off",
            log_config=None,
            access_log=options.log_level == "debug",
            server_header=False,
            timeout_graceful_shutdown=max(1, round(options.shutdown_grace)),
        )
    )
    if shadows is not None:
        await shadows.start()
    await grpc_server.start()
    http_task = asyncio.create_task(http.serve(sockets=[http_socket]), name="http")
    service.ready = True
    await health.set_serving(True)
    stage_names = " -> ".join(plan.variants for plan in spec.stages)
    log.info("ready: application %r (%s) through %s", spec.name, stage_names, options.outbound)
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({stopped, http_task}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if http_task.done() and not stop.is_set():
        log.critical(
            "the HTTP server stopped unexpectedly: %r", None if http_task.cancelled() else http_task.exception()
        )
        code = 1
    stopped.cancel()
    service.ready = False
    await health.shutdown()
    http.should_exit = True
    await asyncio.gather(grpc_server.stop(options.shutdown_grace), http_task, return_exceptions=True)
    if shadows is not None:
        await shadows.close()
    await executor.close()
    log.info("stopped")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m runtimes.pipeline``. Why it gives up is logged at CRITICAL, so at any --log-level."""
    options = parse_args(argv)
    configure_logging(options.log_level)
    try:
        spec = load_spec(options.spec)
    except PipelineSpecError as exc:
        log.critical("%s", exc)
        return 1
    try:
        tracing = setup_tracing(f"pipeline {spec.name}", attributes={"hydro.application": spec.name})
    except InvalidEndpoint as exc:
        log.critical("tracing: %s", exc)
        return 1
    try:
        return uvloop.run(serve(options, spec))
    finally:
        tracing.shutdown()
