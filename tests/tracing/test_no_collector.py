"""With a collector configured but not listening, requests still succeed, the proxies and the runtime stop making
spans, and the runtime's log holds at most a few tracing lines; once a collector listens there, tracing resumes
everywhere (tests/tracing/traced_stack.py runs the stack)."""

from __future__ import annotations

import time
from pathlib import Path

from otlp_receiver import OtlpReceiver, ReceivedSpan
from traced_stack import traced_stack

from manager_api.etcd_server import EtcdServer
from manager_api.ports import free_port
from manager_api.processes import wait_until

TRACE_HEADER = "x-hydro-trace-id"


def test_a_dead_collector_slows_nothing_floods_no_log_and_tracing_resumes_with_it(
    etcd_server: EtcdServer, tmp_path: Path
) -> None:
    port = free_port()  # nothing listens there yet
    address = f"127.0.0.1:{port}"
    runtime_env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{address}",
        # Export attempts as often as possible, and give up on each quickly: many failures in a short test.
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
    }
    with traced_stack(
        etcd_server.endpoint, tmp_path, otlp_endpoint=f"127.0.0.1:{port}", runtime_env=runtime_env
    ) as stack:
        # xds_control finds nobody at the collector's address and takes tracing out of the proxies' config.
        wait_until(lambda: TRACE_HEADER not in stack.rest().headers, 15, "the ingress to stop tracing")
        started = time.monotonic()
        answered = 0
        while time.monotonic() < started + 5:
            response = stack.rest(x=float(answered))
            assert response.status_code == 200, response.text
            answered += 1
        assert answered > 30, f"only {answered} requests in 5 s"

        collector = OtlpReceiver().start(port)
        try:
            # Both the proxies' config and the runtime's tracer come back within a probe interval or two.
            wait_until(lambda: TRACE_HEADER in stack.rest().headers, 20, "the ingress to trace again")

            def traced_again(spans: list[ReceivedSpan]) -> bool:
                response = stack.rest()
                trace_id = response.headers.get(TRACE_HEADER)
                return any(s.service.startswith("runtime") for s in spans) and trace_id is not None

            collector.wait_for(traced_again, 20, "runtime spans at the new collector")

            # The sidecar's traced listener serves the ingress's connections too, not only new ones: those opened
            # before it got it are closed at once (Envoy's immediate drain), so the next requests are whole traces
            # (with the gradual default a few requests a second stayed on the old, untraced listener for minutes).
            trace_ids = [stack.rest().headers[TRACE_HEADER] for _ in range(5)]

            def whole(spans: list[ReceivedSpan]) -> bool:
                services = {trace_id: set[str]() for trace_id in trace_ids[2:]}
                for span in spans:
                    if span.trace_id in services:
                        services[span.trace_id].add(span.service.split(" ")[0])
                return all(found == {"ingress", "sidecar", "runtime"} for found in services.values())

            collector.wait_for(whole, 15, "whole traces (ingress, sidecar, runtime) of requests after the return")
        finally:
            collector.stop()
        log = stack.runtime_log()
    # Tracing paused (one line says so) instead of making spans nobody receives, and resumed (one more line).
    tracing_lines = [line for line in log.splitlines() if "opentelemetry" in line or "tracing" in line]
    assert any("tracing paused" in line for line in tracing_lines), log
    assert len(tracing_lines) <= 4, "\n".join(tracing_lines)
    assert "Traceback" not in log
