"""xds_control and a real ingress Envoy following the collector: tracing taken out of the proxies while the
collector is down and put back when it returns; a TLS collector (https://, certificate checked against the CA file
the OTEL variables name) and an IPv6 one ([::1]) receive the ingress's spans."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from ingress_stack import IngressStack, ingress_stack
from otlp_receiver import OtlpReceiver, ReceivedSpan
from tls_collector import TestCa, TlsOtlpReceiver, running

from manager_api.etcd_server import EtcdServer
from manager_api.processes import wait_until
from xds_control.tracing_config import COLLECTOR_CLUSTER

#: The collector watch probes every 5 s, a probe gives up after 2 s, then the push reaches the Envoy.
CONFIG_DEADLINE = 30


def _environ(**extra: str) -> dict[str, str]:
    """The test process's environment without its OTEL_* variables, plus ``extra``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}, **extra}


def _ingress_traces(stack: IngressStack) -> bool:
    """Whether the ingress Envoy runs with the collector cluster and a tracing block (from its /config_dump)."""
    dump = httpx.get(f"http://127.0.0.1:{stack.admin_port}/config_dump", timeout=5).text
    return COLLECTOR_CLUSTER in dump and "envoy.tracers.opentelemetry" in dump


def _ingress_spans(stack: IngressStack, collector: OtlpReceiver, what: str) -> list[ReceivedSpan]:
    """Requests to the ingress (no application: Envoy answers itself, and traces that) until its spans arrive."""

    def arrived(spans: list[ReceivedSpan]) -> bool:
        httpx.get(f"{stack.url}/v2/models/none/ready", timeout=5)
        return any(s.service == "ingress" for s in spans)

    return collector.wait_for(arrived, CONFIG_DEADLINE, what)


def test_tracing_leaves_the_proxies_while_the_collector_is_down_and_returns_with_it(
    etcd_server: EtcdServer, tmp_path: Path
) -> None:
    collector = OtlpReceiver().start()
    port = collector.port
    again: OtlpReceiver | None = None
    try:
        with ingress_stack(
            etcd_server.endpoint, tmp_path, xds_args=["--otlp-endpoint", collector.endpoint], xds_env=_environ()
        ) as stack:
            wait_until(lambda: _ingress_traces(stack), CONFIG_DEADLINE, "the ingress to trace to the collector")
            collector.stop()
            # Nothing exports through xds_control: only its probe can notice.
            wait_until(lambda: not _ingress_traces(stack), CONFIG_DEADLINE, "tracing out of the ingress")
            again = OtlpReceiver().start(port)
            wait_until(lambda: _ingress_traces(stack), CONFIG_DEADLINE, "tracing back in the ingress")
            _ingress_spans(stack, again, "the ingress's spans at the returned collector")
    finally:
        collector.stop()
        if again is not None:
            again.stop()


def test_an_https_collector_gets_the_ingress_spans_over_checked_tls(etcd_server: EtcdServer, tmp_path: Path) -> None:
    ca = TestCa.create(tmp_path)
    # The CA file the runtimes' exporters would use; xds_control probes with it and gives it to the Envoys.
    environ = _environ(OTEL_EXPORTER_OTLP_CERTIFICATE=str(ca.certificate))
    with running(TlsOtlpReceiver("localhost", *ca.issue("localhost"))) as collector:
        with ingress_stack(
            etcd_server.endpoint,
            tmp_path,
            xds_args=["--otlp-endpoint", f"https://localhost:{collector.port}"],
            xds_env=environ,
        ) as stack:
            wait_until(lambda: _ingress_traces(stack), CONFIG_DEADLINE, "the ingress to trace to the TLS collector")
            _ingress_spans(stack, collector, "the ingress's spans over TLS")


def test_an_ipv6_collector_gets_the_ingress_spans(etcd_server: EtcdServer, tmp_path: Path) -> None:
    if not Path("/proc/net/if_inet6").exists() or not Path("/proc/net/if_inet6").read_text().strip():
        pytest.skip("no IPv6 loopback here")
    with running(OtlpReceiver("[::1]")) as collector:
        with ingress_stack(
            etcd_server.endpoint,
            tmp_path,
            xds_args=["--otlp-endpoint", f"http://[::1]:{collector.port}"],
            xds_env=_environ(),
        ) as stack:
            wait_until(lambda: _ingress_traces(stack), CONFIG_DEADLINE, "the ingress to trace to [::1]")
            _ingress_spans(stack, collector, "the ingress's spans over IPv6")
