"""REST load from wrk (HTTP/1.1 keep-alive): one JSON body POSTed over and over, percentiles from --latency.

Shared by the benchmarks that load a REST endpoint (mesh_overhead.py, runtime_vs_mlserver.py, tracing_overhead.py
through mesh_overhead).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from benchmarks.h2load import need


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(
    url: str, body: str, concurrency: int, seconds: float, headers: Mapping[str, str] | None = None
) -> dict[str, float]:
    """POST ``body`` (JSON) to ``url`` from ``concurrency`` connections for ``seconds``: rps, p50_ms, p99_ms and
    errors (non-2xx/3xx answers)."""
    descriptor, name = tempfile.mkstemp(suffix=".lua")
    os.close(descriptor)
    script = Path(name)
    header_lines = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in (headers or {}).items())
    # [==[ ]==]: a Lua long string, so that a body with quotes or `]]` needs no escaping.
    script.write_text(
        f'wrk.method = "POST"\nwrk.body = [==[{body}]==]\nwrk.headers["Content-Type"] = "application/json"\n'
        + header_lines
    )
    cmd = [need("wrk"), "-t", "1", "-c", str(concurrency), "-d", f"{max(1, round(seconds))}s", "--latency"]
    try:
        out = subprocess.run([*cmd, "-s", str(script), url], capture_output=True, text=True, check=True)
    finally:
        script.unlink(missing_ok=True)
    text = out.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if rps is None:
        sys.exit(f"wrk printed no rate:\n{text}\n{out.stderr}")
    percentiles = {p: _ms(v, u) for p, v, u in re.findall(r"\s+(50|99)%\s+([\d.]+)(us|ms|s)\b", text)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return {
        "rps": float(rps.group(1)),
        "p50_ms": percentiles.get("50", 0.0),
        "p99_ms": percentiles.get("99", 0.0),
        "errors": float(errors.group(1)) if errors else 0.0,
    }
