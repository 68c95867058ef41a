"""The ingress decides which requests are traced; sidecars and runtimes follow its decision (the sampled flag of
``traceparent``), so a trace is whole or absent, never a runtime span without its ingress."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
from otlp_receiver import OtlpReceiver, ReceivedSpan
from traced_stack import APP_REST, TracedStack, traced_stack

from manager_api.etcd_server import EtcdServer


@pytest.fixture(scope="module")
def unsampled_stack(
    etcd_server: EtcdServer, receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TracedStack]:
    runtime_env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{receiver.endpoint}", "OTEL_BSP_SCHEDULE_DELAY": "200"}
    with traced_stack(
        etcd_server.endpoint,
        tmp_path_factory.mktemp("unsampled"),
        otlp_endpoint=receiver.endpoint,
        runtime_env=runtime_env,
        sampling_percent=0,
    ) as running:
        yield running


def test_sidecars_and_runtimes_follow_the_ingress_s_decision(
    unsampled_stack: TracedStack, receiver: OtlpReceiver
) -> None:
    receiver.clear()
    unsampled = unsampled_stack.rest(x=1.0)
    assert unsampled.status_code == 200
    # A health check straight to the sidecar has no trace context: no trace (it samples nothing of its own).
    assert httpx.get(f"http://127.0.0.1:{unsampled_stack.replica.inbound_port}/v2/health/ready").status_code == 200
    # A request straight to the sidecar whose x-request-id says "sampled" (as an ingress that traces writes it:
    # Envoy keeps the sampling state in the UUID's version digit, 9) is the marker: once its spans are in, every
    # span the sidecar and the runtime made before it is too (each exports in order).
    sampled_id = str(uuid.uuid4())
    sampled_id = sampled_id[:14] + "9" + sampled_id[15:]
    marker = httpx.post(
        f"http://127.0.0.1:{unsampled_stack.replica.inbound_port}{APP_REST}",
        json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [2.0]}]},
        headers={"x-request-id": sampled_id},
        timeout=10,
    )
    assert marker.status_code == 200

    def marker_complete(spans: list[ReceivedSpan]) -> bool:
        ids = {s.span_id for s in spans}
        runtimes = [s for s in spans if s.service.startswith("runtime")]
        return bool(runtimes) and all(s.parent_id in ids for s in runtimes)

    spans = receiver.wait_for(marker_complete, 20, "the marker request's spans from the sidecar and the runtime")
    (runtime,) = [s for s in spans if s.service.startswith("runtime")]
    by_id = {s.span_id: s for s in spans}
    root = by_id[runtime.parent_id]
    assert root.service.startswith("sidecar") and root.parent_id == "", "the only runtime span is the marker's"
    assert [s for s in spans if s.parent_id == ""] == [root], "no other request left a span in the sidecar"
    assert not [s for s in spans if s.service == "ingress"], "the ingress samples nothing at 0 %"
