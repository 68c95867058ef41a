"""Tracing settings from OTEL_* variables, the quiet export log, and what a process does with a bad endpoint."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from otlp_receiver import OtlpReceiver

from manager_api.ports import free_port
from manager_api.processes import wait_until
from tracing.collector_watch import PROBE_INTERVAL_SECONDS
from tracing.provider import active_tracer, setup_tracing
from tracing.quiet_export import RateLimitFilter
from tracing.settings import InvalidEndpoint, TracingSettings, parse_endpoint
from xds_control.__main__ import envoy_tracing
from xds_control.tracing_config import EnvoyTracing


@pytest.mark.parametrize(
    ("text", "host", "port", "secure"),
    [
        ("collector:4317", "collector", 4317, False),
        ("http://127.0.0.1:9999", "127.0.0.1", 9999, False),
        ("https://otel.example.com", "otel.example.com", 4317, True),
        ("localhost", "localhost", 4317, False),
        ("http://[fd00::5]:4317", "fd00::5", 4317, False),
        ("[::1]", "::1", 4317, False),
    ],
)
def test_endpoints(text: str, host: str, port: int, secure: bool) -> None:
    address = parse_endpoint(text)
    assert (address.host, address.port, address.secure) == (host, port, secure)


@pytest.mark.parametrize(
    ("text", "url", "target"),
    [
        ("http://[fd00::5]:4317", "http://[fd00::5]:4317", "[fd00::5]:4317"),
        ("https://[::1]", "https://[::1]:4317", "[::1]:4317"),
        ("collector:4317", "http://collector:4317", "collector:4317"),
    ],
)
def test_an_ipv6_collector_keeps_its_brackets(text: str, url: str, target: str) -> None:
    address = parse_endpoint(text)
    assert (address.url, address.target, str(address)) == (url, target, target)


def test_spans_reach_a_collector_on_ipv6_loopback() -> None:
    if not socket.has_ipv6 or not Path("/proc/net/if_inet6").read_text().strip():
        pytest.skip("no IPv6 loopback here")
    collector = OtlpReceiver(host="[::1]").start()
    tracing = setup_tracing("unit", environ={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://[::1]:{collector.port}"})
    try:
        assert tracing.watch is not None
        wait_until(lambda: tracing.watch is not None and tracing.watch.up, 10, "the probe to reach [::1]")
        tracer = active_tracer()
        assert tracer is not None
        tracer.start_span("over-ipv6").end()
        tracing.shutdown()
        collector.wait_for(lambda spans: any(s.name == "over-ipv6" for s in spans), 10, "the span over IPv6")
    finally:
        tracing.shutdown()
        collector.stop()


def test_the_exporter_channel_retries_a_failing_collector_at_least_every_probe_interval() -> None:
    """gRPC's own back-off between connection attempts grows 1.6x from 1 s (+-20 % jitter) up to 120 s; the
    exporter's channel keeps trying at least every probe interval (+ jitter), so after an outage it is connected
    about when the probe resumes tracing."""
    listener = socket.create_server(("127.0.0.1", 0))
    attempts: list[float] = []

    def refuse_http2() -> None:
        # Accepts and hangs up: a connection attempt that fails, and that can be counted.
        with contextlib.suppress(OSError):
            while True:
                connection, _ = listener.accept()
                attempts.append(time.monotonic())
                connection.close()

    threading.Thread(target=refuse_http2, name="refuse-http2", daemon=True).start()
    port = listener.getsockname()[1]
    tracing = setup_tracing("unit", environ={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"})
    try:
        assert tracing.exporter is not None and tracing.watch is not None
        # Only the exporter's channel may connect here (the probe would add its own attempts, one per interval).
        tracing.watch.stop()
        channel = tracing.exporter._channel
        assert channel is not None
        channel.subscribe(lambda state: None, try_to_connect=True)
        # About 25 s capped; gRPC's default back-off would take about 45 s.
        wait_until(lambda: len(attempts) >= 8, 40, "8 connection attempts", interval=0.5)
    finally:
        tracing.shutdown()
        listener.close()
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    # gRPC jitters each back-off by up to 20 %, and the accept thread runs on a loaded machine: room above the cap,
    # still far below the 12.5 s gaps of the uncapped back-off.
    assert max(gaps) < PROBE_INTERVAL_SECONDS * 1.6, gaps


def test_a_ca_file_for_the_collector_is_read_and_checked(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here, only found")
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://otel.example.com"}
    settings = TracingSettings.from_environ({**endpoint, "OTEL_EXPORTER_OTLP_CERTIFICATE": str(ca)})
    assert settings.collector is not None and settings.collector.ca_file == str(ca)
    with pytest.raises(InvalidEndpoint, match="does not exist"):
        TracingSettings.from_environ({**endpoint, "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": str(tmp_path / "none")})


def test_a_ca_file_is_made_absolute_and_ignored_for_a_plain_text_collector(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ca.pem").write_text("found, not parsed")
    monkeypatch.chdir(tmp_path)
    secure = TracingSettings.from_environ(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://otel.example.com", "OTEL_EXPORTER_OTLP_CERTIFICATE": "ca.pem"}
    )
    # The Envoys read the file too, from their own working directory.
    assert secure.collector is not None and secure.collector.ca_file == str(tmp_path / "ca.pem")
    # Set for other exporters, naming a file that is not here: no matter to a collector without TLS.
    missing = {"OTEL_EXPORTER_OTLP_CERTIFICATE": str(tmp_path / "elsewhere.pem")}
    plain = TracingSettings.from_environ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4317", **missing})
    assert plain.collector is not None and plain.collector.ca_file is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", missing["OTEL_EXPORTER_OTLP_CERTIFICATE"])
    envoys = envoy_tracing("http://otel:4317", 100.0)
    assert envoys is not None and envoys.collector.ca_file is None


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty"),
        ("ftp://x:1", "scheme"),
        ("host:notaport", "port"),
        ("http://host:4317/v1/traces", "path"),
        (":4317", "no host"),
    ],
)
def test_bad_endpoints_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(InvalidEndpoint, match=says):
        parse_endpoint(text)


def test_off_without_endpoint_or_when_disabled() -> None:
    assert not TracingSettings.from_environ({}).enabled
    on = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}
    assert TracingSettings.from_environ(on).enabled
    assert not TracingSettings.from_environ({**on, "OTEL_SDK_DISABLED": "true"}).enabled
    assert not TracingSettings.from_environ({**on, "OTEL_TRACES_EXPORTER": "none"}).enabled
    traces_only = TracingSettings.from_environ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "c:1", **on})
    assert str(traces_only.collector) == "c:1", "the traces-specific variable wins"
    assert TracingSettings.from_environ({"OTEL_EXPORTER_OTLP_ENDPOINT": "c:1", "OTEL_EXPORTER_OTLP_INSECURE": "false"})


def test_setup_without_collector_installs_nothing() -> None:
    tracing = setup_tracing("unit", environ={"OTEL_SERVICE_NAME": "named"})
    assert not tracing.enabled and active_tracer() is None
    assert tracing.service_name == "named", "OTEL_SERVICE_NAME overrides the process's own name"
    tracing.shutdown()


def test_a_dead_collector_pauses_tracing_and_holds_up_no_exit() -> None:
    tracing = setup_tracing("unit", environ={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}"})
    assert tracing.configured
    wait_until(lambda: active_tracer() is None, 5, "the probe to find nobody there and pause tracing")
    started = time.monotonic()
    tracing.shutdown(timeout_seconds=0.5)
    assert time.monotonic() - started < 2


def test_spans_reach_a_live_collector(receiver: OtlpReceiver) -> None:
    tracing = setup_tracing("unit", environ={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{receiver.endpoint}"})
    try:
        wait_until(lambda: active_tracer() is not None, 10, "the collector probe to arm the tracer")
        tracer = active_tracer()
        assert tracer is not None
        tracer.start_span("probe-me").end()
    finally:
        tracing.shutdown()
    spans = receiver.wait_for(lambda spans: any(s.name == "probe-me" for s in spans), 10, "the span")
    assert next(s for s in spans if s.name == "probe-me").service == "unit"


def test_rate_limit_filter_passes_one_message_per_interval_and_counts_the_rest() -> None:
    now = [0.0]
    limiter = RateLimitFilter(interval=60, clock=lambda: now[0])

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("x", logging.WARNING, __file__, 1, message, None, None)

    assert limiter.filter(record("first"))
    assert not any(limiter.filter(record("again")) for _ in range(5))
    now[0] = 61
    later = record("later")
    assert limiter.filter(later)
    assert "5 similar" in later.getMessage()


def test_envoy_sampling_percentage_is_checked() -> None:
    with pytest.raises(ValueError, match="between 0 and 100"):
        EnvoyTracing.from_endpoint("127.0.0.1:4317", sampling_percent=150)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--otlp-endpoint", "ftp://x:1"], "--otlp-endpoint"),
        (["--otlp-endpoint", "127.0.0.1:4317", "--trace-sampling-percent", "101"], "--trace-sampling-percent"),
    ],
)
def test_xds_control_refuses_bad_tracing_flags(argv: list[str], says: str) -> None:
    done = subprocess.run([sys.executable, "-m", "xds_control", *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and says in done.stderr, done.stderr


def test_runtime_refuses_a_bad_endpoint() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "ftp://nowhere:1", "PATH": "/usr/bin:/bin"}
    argv = [sys.executable, "-m", "runtimes", "--model-dir", "/nonexistent", "--name", "m", "--version", "1"]
    argv += ["--grpc-port", "1", "--http-port", "2"]  # never bound: the endpoint is refused first
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 1 and "tracing: OTLP endpoint" in done.stderr, done.stderr


def test_tracing_resumes_when_the_collector_comes_back() -> None:
    port = free_port()
    tracing = setup_tracing("unit", environ={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"})
    assert tracing.watch is not None
    tracing.watch.interval = 0.2
    collector = OtlpReceiver()
    try:
        wait_until(lambda: tracing.watch is not None and tracing.watch.probed, 10, "a first probe")
        assert active_tracer() is None, "paused while nothing listens"
        collector.start(port)
        wait_until(lambda: active_tracer() is not None, 10, "tracing to resume")
    finally:
        tracing.shutdown()
        collector.stop()


def test_xds_control_refuses_a_missing_ca_file(tmp_path: Path) -> None:
    env = {**os.environ, "OTEL_EXPORTER_OTLP_CERTIFICATE": str(tmp_path / "missing.pem")}
    argv = [sys.executable, "-m", "xds_control", "--otlp-endpoint", "https://otel.example.com"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2 and "missing.pem" in done.stderr and "does not exist" in done.stderr, done.stderr
