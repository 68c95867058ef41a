"""The runtime process: one model version served over gRPC and HTTP from one asyncio event loop.

Order of events: read serving.yaml, bind both ports (so a port clash fails fast), start serving (live, not ready),
load the model and warm it up on worker threads, report ready. With ``--expect-digest`` the model folder is first
checked against the digest registered at upload (runtimes/model_digest.py): a folder that differs exits 1 naming
the first differing, missing or extra file, before any of its code runs. SIGTERM or SIGINT: report not ready, stop
accepting, let in-flight requests finish for a few seconds, exit 0. A load failure exits 1 with the reason on
stderr; a second SIGINT exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.metadata
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import uvicorn
import uvloop

from runtimes.base import create_runtime
from runtimes.batching import BatchingOptions
from runtimes.dataplane import DataPlane, default_predict_threads
from runtimes.errors import ModelLoadError
from runtimes.grpc_service import HealthReporter, create_grpc_server
from runtimes.model_digest import PYCACHE, FolderMismatch, verify_folder
from runtimes.rest import create_app
from runtimes.rest_fast import with_fast_infer
from runtimes.serving_config import ServingConfigError, load_serving_config
from tracing.provider import setup_tracing
from tracing.settings import InvalidEndpoint

log = logging.getLogger("runtimes")

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class Options:
    """Command-line options of ``python -m runtimes``."""

    model_dir: Path
    name: str
    version: int
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    http_port: int = 8000
    max_message_mb: int = 64
    log_level: str = "info"
    shutdown_grace: float = 5.0
    predict_threads: int = 0
    max_batch_size: int = 0
    max_batch_delay_ms: float = 2.0
    expect_digest: str | None = None
    expect_files: Path | None = None

    @property
    def max_message_bytes(self) -> int:
        """The gRPC message and HTTP body limit in bytes."""
        return self.max_message_mb * 2**20


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Parse ``python -m runtimes`` arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m runtimes",
        description="Serve one model version over the Open Inference Protocol (gRPC and HTTP/JSON).",
    )
    parser.add_argument("--model-dir", type=Path, required=True, help="model folder with serving.yaml")
    parser.add_argument("--name", required=True, help="model name this runtime answers to")
    parser.add_argument("--version", type=int, required=True, help="model version (a positive integer)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--grpc-port", type=int, required=True, help="gRPC port")
    parser.add_argument("--http-port", type=int, required=True, help="HTTP/JSON port")
    parser.add_argument(
        "--max-message-mb", type=int, default=64, help="largest gRPC message / HTTP body in MiB (default: 64)"
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="default: info")
    parser.add_argument(
        "--shutdown-grace", type=float, default=5.0, help="seconds in-flight requests get on shutdown (default: 5)"
    )
    parser.add_argument(
        "--predict-threads",
        type=int,
        default=0,
        help=f"worker threads for predict calls (default: {default_predict_threads()} on this machine)",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=0,
        help="adaptive batching: most rows per predict call; 0 or 1 turns batching off (default: 0)",
    )
    parser.add_argument(
        "--max-batch-delay-ms",
        type=float,
        default=2.0,
        help="adaptive batching: longest a request waits for others to join its batch (default: 2)",
    )
    parser.add_argument(
        "--expect-digest",
        help="refuse to load unless the model folder has this digest (sha256:<hex>, runtimes/model_digest.py)",
    )
    parser.add_argument(
        "--expect-files",
        type=Path,
        help="JSON {path: sha256 hex} registered with --expect-digest, to name the file that differs",
    )
    args = parser.parse_args(argv)
    if args.expect_digest is not None and not _DIGEST_RE.match(args.expect_digest):
        parser.error(f"--expect-digest must be sha256:<64 lower-case hex digits>, got {args.expect_digest!r}")
    if args.expect_files is not None and args.expect_digest is None:
        parser.error("--expect-files needs --expect-digest")
    if args.max_batch_size < 0:
        parser.error("--max-batch-size must be >= 0")
    if not 0 <= args.max_batch_delay_ms <= 10_000:
        parser.error("--max-batch-delay-ms must be between 0 and 10000")
    if args.version < 1:
        parser.error("--version must be a positive integer")
    if args.max_message_mb < 1:
        parser.error("--max-message-mb must be at least 1")
    return Options(
        model_dir=args.model_dir,
        name=args.name,
        version=args.version,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        max_message_mb=args.max_message_mb,
        log_level=args.log_level,
        shutdown_grace=args.shutdown_grace,
        predict_threads=args.predict_threads,
        max_batch_size=args.max_batch_size,
        max_batch_delay_ms=args.max_batch_delay_ms,
        expect_digest=args.expect_digest,
        expect_files=args.expect_files,
    )


def server_version() -> str:
    """This package's version, reported by server metadata."""
    try:
        return importlib.metadata.version("hydro-serving")
    except importlib.metadata.PackageNotFoundError:
        return "0"


class _HttpServer(uvicorn.Server):
    """uvicorn without its own signal handling: the runtime owns SIGTERM/SIGINT for both protocols."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn's handlers would replace ours and re-raise the signal after shutdown, killing the process
        # before the gRPC side has drained.
        yield


#: How long a thread may hold the GIL while another waits for it, while predict threads run: a predict thread
#: holding the GIL makes the event loop wait up to one interval for every step of a health or metadata call. With 8
#: clients on a 30 ms pure-Python model, 1 ms instead of Python's 5 ms took the median gRPC health + metadata probe
#: from 23-58 ms to 7 ms (REST 11-14 -> 4 ms).
BUSY_SWITCH_INTERVAL_SECONDS = 0.001
#: ...and otherwise (Python's default). Not 1 ms all the time: with predicts inline on the event loop, the loop and
#: gRPC's own threads then hand the GIL over so often that a 1-row sklearn model served ~15 % fewer gRPC requests.
IDLE_SWITCH_INTERVAL_SECONDS = 0.005


class _CountingExecutor(ThreadPoolExecutor):
    """A thread pool that knows how many calls are running right now (cancelled awaits do not stop threads)."""

    def __init__(self, max_workers: int) -> None:
        super().__init__(max_workers, thread_name_prefix="predict")
        self._running = 0
        self._lock = threading.Lock()

    @property
    def running(self) -> int:
        """Calls currently executing on a worker thread."""
        with self._lock:
            return self._running

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` on a worker thread, counted while it runs."""

        def counted() -> Any:
            with self._lock:
                self._running += 1
                if self._running == 1:
                    sys.setswitchinterval(BUSY_SWITCH_INTERVAL_SECONDS)
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self._running -= 1
                    if self._running == 0:
                        sys.setswitchinterval(IDLE_SWITCH_INTERVAL_SECONDS)

        return super().submit(counted)


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _fail(message: str) -> int:
    # CRITICAL, not ERROR: the reason the process gives up is logged whatever --log-level says (at "critical" an
    # ERROR record was dropped and a runtime whose model failed to load exited 1 with an empty log).
    log.critical("%s", message)
    return 1


def verify_model_dir(options: Options) -> None:
    """Raise FolderMismatch (or OSError/ValueError for an unreadable --expect-files) unless the folder is the
    registered one; then keep Python from reading or writing bytecode caches in it (they are not in the digest)."""
    if options.expect_digest is None:
        return
    expected = None
    if options.expect_files is not None:
        loaded = json.loads(options.expect_files.read_text())
        if not isinstance(loaded, dict) or not all(isinstance(v, str) for v in loaded.values()):
            raise ValueError(f"{options.expect_files} is not a JSON object of path -> sha256 hex")
        expected = loaded
    verify_folder(options.model_dir, options.expect_digest, expected)
    # __pycache__ is not in the digest, so bytecode found in the folder is not trusted: removed before the model's
    # modules are imported, and none written (replicas share the folder). Other caches (site-packages) still serve.
    sys.dont_write_bytecode = True
    for cache in sorted(options.model_dir.rglob(PYCACHE)):
        if not os.path.lexists(cache):  # inside one removed before it
            continue
        if cache.is_dir() and not cache.is_symlink():
            shutil.rmtree(cache)
        else:
            cache.unlink()


async def serve(options: Options) -> int:
    """Run the runtime until a signal or a failure; the process exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(sig: int) -> None:
        name = signal.Signals(sig).name
        if not stop.is_set():
            log.info("%s received: shutting down", name)
            stop.set()
        elif sig == signal.SIGINT:
            # A second Ctrl-C is a person who does not want to wait. A second SIGTERM is not: supervisors send one
            # to the process group and the kernel another when the parent dies (PR_SET_PDEATHSIG).
            log.warning("second SIGINT: exiting without waiting for in-flight requests")
            logging.shutdown()
            os._exit(130)
        else:
            log.info("%s received again: already shutting down", name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    where = f"model {options.name!r} version {options.version} from {options.model_dir}"
    try:
        await asyncio.to_thread(verify_model_dir, options)
    except FolderMismatch as exc:
        return _fail(f"refusing to load {where}: {exc}")
    except (OSError, ValueError) as exc:
        return _fail(f"cannot check {where} against {options.expect_digest}: {exc}")
    try:
        config = load_serving_config(options.model_dir)
        runtime = create_runtime(options.model_dir, config)
    except (ServingConfigError, KeyError, ImportError, OSError) as exc:
        return _fail(f"cannot load {where}: {exc}")

    grpc_address = f"{options.host}:{options.grpc_port}"
    # Said before the gRPC server is created (gRPC's threads start with it, unless tracing's exporter started them
    # earlier): a runtime log without this line is from a process that died before it got here, e.g. the forked
    # child of a parent whose grpcio fork handlers are on, killed before its exec (docs/runtimes.md, "A log with
    # only a gRPC line").
    log.info(
        "loading %s (%s runtime); gRPC on %s, HTTP on port %d", where, config.runtime, grpc_address, options.http_port
    )
    executor = _CountingExecutor(options.predict_threads or default_predict_threads())
    batching = (
        BatchingOptions(options.max_batch_size, options.max_batch_delay_ms) if options.max_batch_size > 1 else None
    )
    dataplane = DataPlane(runtime, name=options.name, version=options.version, executor=executor, batching=batching)
    version = server_version()
    grpc_server, health = create_grpc_server(
        dataplane, server_version=version, max_message_bytes=options.max_message_bytes
    )
    await health.set_serving(False)
    try:
        if grpc_server.add_insecure_port(grpc_address) == 0:
            raise RuntimeError("the port is in use or the address is invalid")
        http_socket = _bind(options.host, options.http_port)
    except (RuntimeError, OSError) as exc:
        return _fail(
            f"cannot listen on {options.host} (gRPC port {options.grpc_port}, HTTP port {options.http_port}): {exc}"
        )

    app = create_app(dataplane, server_version=version, max_body_bytes=options.max_message_bytes)
    http = _HttpServer(
        uvicorn.Config(
            with_fast_infer(app, dataplane, max_body_bytes=options.max_message_bytes),
            lifespan="off",
            log_config=None,
            access_log=options.log_level == "debug",
            server_header=False,
            # The sidecar is the only client; rewriting client addresses from headers would only cost time.
            proxy_headers=False,
            timeout_graceful_shutdown=max(1, round(options.shutdown_grace)),
        )
    )
    await grpc_server.start()
    http_task = asyncio.create_task(http.serve(sockets=[http_socket]), name="http")
    load_task = asyncio.create_task(dataplane.load(), name="load")
    stop_task = asyncio.create_task(stop.wait(), name="stop")

    code = 0
    await asyncio.wait({load_task, stop_task, http_task}, return_when=asyncio.FIRST_COMPLETED)
    if load_task.done() and not load_task.cancelled() and load_task.exception() is None:
        # Everything loaded so far (libraries, the model) lives as long as the process and is never garbage: keep
        # the collector's full passes under load from rescanning it (a pause for every request in flight).
        gc.collect()
        gc.freeze()
        await health.set_serving(True)
        log.info("ready: model %r version %d", options.name, options.version)
        await asyncio.wait({stop_task, http_task}, return_when=asyncio.FIRST_COMPLETED)
    elif load_task.done():
        error = load_task.exception()
        if not isinstance(error, ModelLoadError):
            log.error("loading failed", exc_info=error)
        code = _fail(f"cannot load {where}: {error}")
    if http_task.done() and not stop.is_set():
        reason = "cancelled" if http_task.cancelled() else repr(http_task.exception())
        code = _fail(f"the HTTP server stopped unexpectedly: {reason}")

    await _shutdown(options, dataplane, health, grpc_server, http, http_task)
    for task in (load_task, stop_task):
        task.cancel()
    dataplane.shutdown_executor()
    if executor.running:
        # A prediction (or the model load) is stuck past the grace period; joining its thread at exit would hang.
        log.warning("%d call(s) still running on worker threads; exiting without them", executor.running)
        logging.shutdown()
        os._exit(code)
    log.info("stopped")
    return code


async def _shutdown(
    options: Options,
    dataplane: DataPlane,
    health: HealthReporter,
    grpc_server: grpc.aio.Server,
    http: _HttpServer,
    http_task: asyncio.Task[None],
) -> None:
    dataplane.stop()
    await health.shutdown()
    http.should_exit = True
    # Both servers stop accepting at once and give in-flight requests the same grace period.
    results = await asyncio.gather(
        grpc_server.stop(options.shutdown_grace),
        asyncio.wait_for(asyncio.shield(http_task), options.shutdown_grace + 2),
        return_exceptions=True,
    )
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            log.warning("shutdown: %r", result)
    if not http_task.done():
        http.force_exit = True
        http_task.cancel()


def configure_logging(level: str) -> None:
    """Log to stderr (the process supervisor captures it) at ``level``."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m runtimes``."""
    options = parse_args(argv)
    configure_logging(options.log_level)
    try:
        tracing = setup_tracing(
            f"runtime {options.name}:{options.version}",
            attributes={"hydro.model": options.name, "hydro.version": options.version},
        )
    except InvalidEndpoint as exc:
        return _fail(f"tracing: {exc}")
    # uvloop (as MLServer and uvicorn[standard] use): measured ~1.3x the requests per second of the default loop
    # for both grpc.aio and uvicorn on a small model.
    try:
        return uvloop.run(serve(options))
    finally:
        tracing.shutdown()
