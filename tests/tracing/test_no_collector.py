"""With a collector configured but not listening, requests still succeed at their usual pace and the runtime's log
holds at most a few tracing lines (tests/tracing/traced_stack.py runs the stack)."""

from __future__ import annotations

import time
from pathlib import Path

from traced_stack import traced_stack

from manager_api.etcd_server import EtcdServer
from manager_api.processes import free_port


def test_a_dead_collector_slows_nothing_and_floods_no_log(etcd_server: EtcdServer, tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    runtime_env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{dead}",
        # Export attempts as often as possible, and give up on each quickly: many failures in a short test.
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
    }
    with traced_stack(etcd_server.endpoint, tmp_path, otlp_endpoint=dead, runtime_env=runtime_env) as stack:
        started = time.monotonic()
        deadline = started + 8
        answered = 0
        # Requests for several seconds: several export batches fail meanwhile.
        while time.monotonic() < deadline:
            response = stack.rest(x=float(answered))
            assert response.status_code == 200, response.text
            assert response.headers.get("x-hydro-trace-id"), "Envoy still traces (and drops what it cannot send)"
            answered += 1
        log = stack.runtime_log()
    assert answered > 50, f"only {answered} requests in 8 s"
    # Tracing pauses (one line says so) instead of making spans nobody receives: no export, no export errors.
    tracing_lines = [line for line in log.splitlines() if "opentelemetry" in line or "tracing" in line]
    assert any("tracing paused" in line for line in tracing_lines), log
    assert len(tracing_lines) <= 3, "\n".join(tracing_lines)
    assert "Traceback" not in log
