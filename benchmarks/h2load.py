"""Unary gRPC load from h2load (nghttp2): one pre-encoded request sent over and over, percentiles from its log.

Shared by the benchmarks that load a gRPC endpoint (mesh_overhead.py, pipeline_overhead.py, tracing_overhead.py
through mesh_overhead). h2load counts HTTP 200s, and a gRPC error is an HTTP 200 too: check one request with a
real gRPC client before the load.

The error count is h2load's own "failed" figure, not the non-200 lines of its per-request log. In that log a
stream whose response headers arrived during --warm-up-time but whose end came after it has status 0 (h2load
records the status only in the main phase) although it succeeded: a server that sends its headers apart from the
message and trailers (the pipeline runtime sends x-hydro-stages first) shows one or two of those per run.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from google.protobuf.message import Message


def need(tool: str) -> str:
    """The path of a load generator, or exit saying how to install it."""
    found = shutil.which(tool)
    if not found:
        sys.exit(f"{tool} is not installed: run `make bench-deps` first")
    return found


def grpc_frame(message: Message) -> bytes:
    """``message`` as one length-prefixed, uncompressed gRPC message (what h2load sends as the request body)."""
    body = message.SerializeToString()
    return b"\x00" + struct.pack(">I", len(body)) + body


def summary(rps: float, durations: Sequence[float], errors: int) -> dict[str, float]:
    """rps, p50_ms, p99_ms and errors of a run from its per-request durations (ms)."""
    ordered = sorted(durations) or [0.0]
    return {
        "rps": rps,
        "p50_ms": statistics.median(ordered),
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "errors": float(errors),
    }


def run_h2load(
    target: str,
    frame: Path,
    concurrency: int,
    seconds: float,
    headers: Mapping[str, str] | None = None,
    *,
    requests: int | None = None,
) -> dict[str, float]:
    """ModelInfer calls to ``target`` (HOST:PORT) with the body in ``frame``, ``concurrency`` connections of one
    stream each: for ``seconds`` after a one-second warm-up, or exactly ``requests`` calls when given."""
    descriptor, name = tempfile.mkstemp(suffix=".log")
    os.close(descriptor)  # h2load writes the file by its name
    log = Path(name)
    cmd = [need("h2load"), "-c", str(concurrency), "-m", "1", "-t", "1"]
    if requests is None:
        cmd += ["-D", f"{max(1, round(seconds))}s", "--warm-up-time=1"]
    else:
        cmd += ["-n", str(requests)]
    cmd += ["-d", str(frame), "-H", "content-type: application/grpc", "-H", "te: trailers", f"--log-file={log}"]
    for key, value in (headers or {}).items():
        cmd += ["-H", f"{key}: {value}"]
    cmd.append(f"http://{target}/inference.GRPCInferenceService/ModelInfer")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        durations, statuses = [], []
        for line in log.read_text().splitlines():
            _, status, micros = line.split("\t")[:3]
            statuses.append(int(status))
            durations.append(int(micros) / 1000)
    finally:
        log.unlink(missing_ok=True)
    ok = sum(1 for s in statuses if s == 200)
    failed = failed_requests(out)
    if ok < len(statuses) or failed:
        # Which statuses, so that an error count can be told apart from a reset stream (status -1) and from a
        # success whose headers came during the warm-up (status 0).
        others = Counter(s for s in statuses if s != 200)
        print(f"  {target}: {failed} failed; non-200 statuses in the log {dict(others)}", file=sys.stderr)
    match = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
    rps = float(match.group(3)) if match else ok / seconds
    return summary(rps, durations, failed)


def failed_requests(output: str) -> int:
    """h2load's count of failed requests: reset or cut-off streams and non-2xx/3xx statuses, in the measured phase.

    Unlike the log, it counts a stream whose headers came during the warm-up as succeeded (h2load marks those
    so without reading their status), and it includes requests lost with a broken connection (no line in the log).
    """
    match = re.search(r"^requests: .*?, \d+ succeeded, (\d+) failed, ", output, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no request summary in h2load's output:\n{output}")
    return int(match.group(1))
