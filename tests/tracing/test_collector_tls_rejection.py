"""Envoy itself checks a TLS collector's certificate: one Envoy with the ingress's traced listener and the
collector cluster xds_control builds (xds_control.tracing_config), run on a static bootstrap, sends its spans to
a collector whose certificate the given CA issued to the collector's host name, and refuses a collector whose
certificate names another host or comes from another CA (its TLS statistics count the refusal; the collector
gets nothing).

In the whole stack xds_control's own probe refuses such a collector first and takes tracing out of the Envoys,
so only an Envoy without a control plane shows that the cluster's validation context is there and works.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from otlp_receiver import ReceivedSpan
from tls_collector import TestCa, TlsOtlpReceiver, running

from manager_api.ports import free_port
from manager_api.processes import ChildProcess, wait_until
from tracing.settings import parse_endpoint, with_ca_file
from xds_control.bootstrap import envoy_process, envoy_ready
from xds_control.resources.listeners import http_listener
from xds_control.resources.routes import direct_route, route_configuration
from xds_control.tracing_config import (
    COLLECTOR_CLUSTER,
    INGRESS_SERVICE,
    EnvoyTracing,
    ingress_response_headers,
    tracing_hook,
)

# benchmarks/ is not an installed package: the benchmarks themselves run from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.static_envoy import static_bootstrap

#: Envoy flushes spans every second (the sidecar template's runtime layer); room for a loaded machine.
EXPORT_DEADLINE = 45
#: The collector's host: a name (not an address), so that Envoy sends it as SNI and matches it as a DNS SAN.
COLLECTOR_HOST = "localhost"


@dataclass(frozen=True)
class TracedEnvoy:
    """A running Envoy that traces every request it answers (it answers them itself)."""

    process: ChildProcess
    port: int
    admin_port: int

    def request(self) -> bool:
        """One request (sampled: the ingress's tracing samples 100 %); whether it was answered 2xx."""
        return httpx.get(f"http://127.0.0.1:{self.port}/v2/models/iris/ready", timeout=5).is_success

    def collector_tls_stats(self) -> dict[str, int]:
        """The collector cluster's TLS counters (``cluster.otel|collector.ssl.*``) by their last part."""
        prefix = f"cluster.{COLLECTOR_CLUSTER}.ssl."
        text = httpx.get(f"http://127.0.0.1:{self.admin_port}/stats", params={"filter": "ssl"}, timeout=5).text
        stats = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if name.startswith(prefix) and value.strip().isdigit():
                stats[name.removeprefix(prefix)] = int(value)
        return stats


@contextmanager
def traced_envoy(work: Path, tracing: EnvoyTracing) -> Iterator[TracedEnvoy]:
    """An Envoy whose listener is the ingress's (tracing as xds_control configures it) with one route answered
    directly, and whose one cluster is the collector's; stopped on leaving, also on failure."""
    port, admin_port = free_port(), free_port()
    routes = route_configuration(
        "traced", [direct_route("answer", "/", 200, '{"ready":true}')], ingress_response_headers(tracing)
    )
    listener = http_listener(
        "traced", "127.0.0.1", port, route_config=routes, configure=tracing_hook(tracing, INGRESS_SERVICE, ingress=True)
    )
    bootstrap = static_bootstrap(listener, [tracing.collector_cluster()], admin_port)
    process = envoy_process("traced", bootstrap, work, admin_port)
    try:
        process.start()
        process.wait_ready(functools.partial(envoy_ready, admin_port), 30)
        yield TracedEnvoy(process, port, admin_port)
    finally:
        process.stop()


def _tls_tracing(collector_port: int, ca: TestCa) -> EnvoyTracing:
    """Tracing to ``https://localhost:PORT`` trusting ``ca``, read as xds_control reads its environment."""
    collector = parse_endpoint(f"https://{COLLECTOR_HOST}:{collector_port}")
    return EnvoyTracing(with_ca_file(collector, {"OTEL_EXPORTER_OTLP_CERTIFICATE": str(ca.certificate)}))


def test_envoy_sends_spans_to_a_collector_certified_for_its_name(tmp_path: Path) -> None:
    ca = TestCa.create(tmp_path)
    with (
        running(TlsOtlpReceiver(COLLECTOR_HOST, *ca.issue(COLLECTOR_HOST))) as collector,
        traced_envoy(tmp_path, _tls_tracing(collector.port, ca)) as envoy,
    ):

        def arrived(spans: list[ReceivedSpan]) -> bool:
            assert envoy.request()
            return any(s.service == INGRESS_SERVICE for s in spans)

        collector.wait_for(arrived, EXPORT_DEADLINE, "the Envoy's spans at the TLS collector")
        stats = envoy.collector_tls_stats()
        assert stats["handshake"] > 0, stats
        assert not any(value for name, value in stats.items() if name.startswith("fail_verify")), stats


def _certified_for_another_name(ca: TestCa, folder: Path) -> tuple[bytes, bytes]:
    return ca.issue("collector.invalid")


def _certified_by_another_ca(ca: TestCa, folder: Path) -> tuple[bytes, bytes]:
    return TestCa.create(folder, "another test CA").issue(COLLECTOR_HOST)


@pytest.mark.parametrize(
    ("certify", "refusal"),
    [
        # The chain is good; the subject alternative name matcher (the collector's host) refuses it.
        (_certified_for_another_name, "fail_verify_san"),
        # The name is right; the chain does not lead to the trusted CA.
        (_certified_by_another_ca, "fail_verify_error"),
    ],
    ids=["another-name", "another-ca"],
)
def test_envoy_refuses_a_collector_whose_certificate_is_wrong(
    tmp_path: Path, certify: Callable[[TestCa, Path], tuple[bytes, bytes]], refusal: str
) -> None:
    ca = TestCa.create(tmp_path)
    with (
        running(TlsOtlpReceiver(COLLECTOR_HOST, *certify(ca, tmp_path))) as collector,
        traced_envoy(tmp_path, _tls_tracing(collector.port, ca)) as envoy,
    ):

        def settled() -> bool:
            """Spans made and an export tried: either Envoy counted the refusal, or the spans got through."""
            assert envoy.request()
            return bool(collector.spans()) or envoy.collector_tls_stats().get(refusal, 0) > 0

        wait_until(settled, EXPORT_DEADLINE, f"an export to the collector ({refusal} or spans at the collector)")
        spans = collector.spans()
        assert not spans, f"{len(spans)} spans reached a collector Envoy should have refused, e.g. {spans[0]}"
        stats = envoy.collector_tls_stats()
        assert stats[refusal] > 0, stats
        assert stats["handshake"] == 0, stats
