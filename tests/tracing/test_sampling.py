"""The ingress decides which requests are traced; sidecars and runtimes follow its decision (the sampled flag of
``traceparent``), so a trace is whole or absent, never a runtime span without its ingress."""

from __future__ import annotations

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
    # A request straight to the sidecar has no parent: the sidecar samples it (100 %), a marker that every span
    # made before it by the sidecar and the runtime has been exported (each exports in order).
    marker = httpx.post(
        f"http://127.0.0.1:{unsampled_stack.replica.inbound_port}{APP_REST}",
        json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [2.0]}]},
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
    inference_roots = [s for s in spans if s.parent_id == "" and s.name.endswith("/infer")]
    assert inference_roots == [root], "the unsampled request left no span in the sidecar either"
    assert not [s for s in spans if s.service == "ingress"], "the ingress samples nothing at 0 %"
