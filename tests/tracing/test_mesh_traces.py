"""One request through the ingress is one trace in the collector: ingress Envoy, sidecar Envoy and runtime spans,
linked parent to child; a retried attempt is a span of its own in the same trace; the response names the trace.

The stack (tests/tracing/traced_stack.py) runs real etcd, xds_control started with the receiver's address, the
ingress Envoy, and a runtime behind its sidecar; the runtime gets the receiver through OTEL_EXPORTER_OTLP_ENDPOINT.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import pytest
from otlp_receiver import OtlpReceiver, ReceivedSpan
from traced_stack import MODEL, VERSION, TracedStack, traced_stack
from tritonclient.grpc import service_pb2

from manager_api.etcd_server import EtcdServer

RUNTIME_SERVICE = f"runtime {MODEL}:{VERSION}"
SIDECAR_SERVICE = f"sidecar {MODEL}:{VERSION}"


@pytest.fixture(scope="module")
def stack(
    etcd_server: EtcdServer, receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TracedStack]:
    runtime_env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{receiver.endpoint}",
        # Export every 200 ms instead of every 5 s: the tests wait for spans.
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    with traced_stack(
        etcd_server.endpoint,
        tmp_path_factory.mktemp("traced"),
        otlp_endpoint=receiver.endpoint,
        runtime_env=runtime_env,
    ) as running:
        yield running


@pytest.fixture(autouse=True)
def fresh(stack: TracedStack, receiver: OtlpReceiver) -> Iterator[None]:
    stack.set_mode("ok")
    receiver.clear()
    yield
    stack.set_mode("ok")


def _by_service(spans: list[ReceivedSpan], service: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.service == service]


def _complete(trace_id: str, runtime_spans: int = 1) -> Callable[[list[ReceivedSpan]], bool]:
    def done(spans: list[ReceivedSpan]) -> bool:
        mine = [s for s in spans if s.trace_id == trace_id]
        return (
            len(_by_service(mine, RUNTIME_SERVICE)) >= runtime_spans
            and len(_by_service(mine, "ingress")) >= 1 + runtime_spans
            and len(_by_service(mine, SIDECAR_SERVICE)) >= runtime_spans
        )

    return done


def test_one_request_is_one_trace_through_ingress_sidecar_and_runtime(
    stack: TracedStack, receiver: OtlpReceiver
) -> None:
    response = stack.rest(x=2.0, rows=3)
    assert response.status_code == 200, response.text
    trace_id = response.headers["x-hydro-trace-id"]
    assert len(trace_id) == 32 and int(trace_id, 16), trace_id
    assert response.headers["x-request-id"]

    everything = receiver.wait_for(_complete(trace_id), 20, "the trace from the ingress, sidecar and runtime")
    request_id = response.headers["x-request-id"]
    tagged = [
        s
        for s in everything
        if request_id in (s.attributes.get("guid:x-request-id"), s.attributes.get("hydro.request_id"))
    ]
    assert len(tagged) == 3 and {s.trace_id for s in tagged} == {trace_id}, "one request, one trace"
    spans = [s for s in everything if s.trace_id == trace_id]
    assert len(spans) == 4, spans
    _check_chain(spans, "rest")
    (runtime,) = _by_service(spans, RUNTIME_SERVICE)
    assert runtime.attributes["hydro.batch_size"] == 3
    assert runtime.attributes["hydro.request_id"] == request_id


def test_grpc_calls_are_traced_the_same_way(stack: TracedStack, receiver: OtlpReceiver) -> None:
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="x", datatype="FP32", shape=[2, 1]).contents.fp32_contents.extend([1.0, 2.0])
    with grpc.insecure_channel(f"127.0.0.1:{stack.listen_port}") as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        _, outcome = call.with_call(request, timeout=10)
    headers = dict(outcome.initial_metadata())
    trace_id = str(headers["x-hydro-trace-id"])
    spans = [
        s for s in receiver.wait_for(_complete(trace_id), 20, "the trace of a gRPC call") if s.trace_id == trace_id
    ]
    _check_chain(spans, "grpc")
    (runtime,) = _by_service(spans, RUNTIME_SERVICE)
    assert runtime.attributes["hydro.batch_size"] == 2


def _check_chain(spans: list[ReceivedSpan], protocol: str) -> None:
    """ingress server -> ingress upstream attempt -> sidecar server -> runtime."""
    by_id = {s.span_id: s for s in spans}

    (ingress_server,) = [s for s in _by_service(spans, "ingress") if s.is_server]
    assert ingress_server.parent_id == "", "the ingress starts the trace"
    (ingress_upstream,) = [s for s in _by_service(spans, "ingress") if s.is_client]
    assert ingress_upstream.parent_id == ingress_server.span_id
    (sidecar_server,) = [s for s in _by_service(spans, SIDECAR_SERVICE) if s.is_server]
    assert sidecar_server.parent_id == ingress_upstream.span_id
    (runtime,) = _by_service(spans, RUNTIME_SERVICE)
    assert by_id[runtime.parent_id] == sidecar_server, "the runtime's span is the sidecar's child"
    assert runtime.is_server and not runtime.error
    assert runtime.attributes["hydro.model"] == MODEL
    assert runtime.attributes["hydro.application"] == MODEL
    assert runtime.attributes["hydro.protocol"] == protocol


def test_a_retried_attempt_is_its_own_span_in_the_same_trace(stack: TracedStack, receiver: OtlpReceiver) -> None:
    # Every other call fails: of two requests, one is answered at once and the other after one retry.
    stack.set_mode("fail-half")
    responses = [stack.rest() for _ in range(2)]
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    trace_ids = [r.headers["x-hydro-trace-id"] for r in responses]
    assert len(set(trace_ids)) == 2

    def attempts(spans: list[ReceivedSpan], trace_id: str) -> list[ReceivedSpan]:
        return [s for s in _by_service(spans, RUNTIME_SERVICE) if s.trace_id == trace_id]

    def settled(spans: list[ReceivedSpan]) -> bool:
        counts = sorted(len(attempts(spans, t)) for t in trace_ids)
        if counts != [1, 2]:
            return False
        retried = next(t for t in trace_ids if len(attempts(spans, t)) == 2)
        # Envoys export on their own schedule: wait for both proxies' spans of both attempts.
        return _complete(retried, runtime_spans=2)(spans)

    spans = receiver.wait_for(settled, 20, "one retried request with every span of both attempts")
    retried = next(t for t in trace_ids if len(attempts(spans, t)) == 2)
    mine = [s for s in spans if s.trace_id == retried]
    (ingress_server,) = [s for s in _by_service(mine, "ingress") if s.is_server]
    upstream_tries = [s for s in _by_service(mine, "ingress") if s.is_client]
    assert len(upstream_tries) == 2, "each attempt is a span of the ingress"
    assert all(s.parent_id == ingress_server.span_id for s in upstream_tries)
    runtime_tries = attempts(spans, retried)
    assert sorted(s.error for s in runtime_tries) == [False, True], "the failed attempt carries the error"
    by_id = {s.span_id: s for s in mine}
    # Each runtime attempt hangs under its own sidecar span, under its own ingress attempt.
    tries_reached = {by_id[by_id[s.parent_id].parent_id].span_id for s in runtime_tries}
    assert tries_reached == {s.span_id for s in upstream_tries}
