"""A config change is one trace from the API call to the push: the manager's write span, and xds_control's span
of the snapshot it pushed to the proxy, as its child (same trace id).

Real parts: etcd, `python -m manager_api` and `python -m xds_control` sending spans to the in-process OTLP
receiver, and one ingress Envoy connected to xds_control.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import aetcd
import httpx
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from otlp_receiver import OtlpReceiver, ReceivedSpan

from manager_api.etcd_server import EtcdServer
from manager_api.ports import free_port
from manager_api.processes import ChildProcess, http_ok
from protos.topology.keys import Keys
from protos.topology.models import Artifact, ModelVersion, Signature, TensorSpec
from tracing.provider import setup_tracing
from xds_control.bootstrap import envoy_ready, ingress_envoy
from xds_control.push_spans import PushSpans
from xds_control.resources.type_urls import CLUSTER
from xds_control.snapshot import Snapshot
from xds_control.translate import NodeInfo

T = TypeVar("T")
INGRESS = "ingress"
#: Export every 200 ms instead of every 5 s: the tests wait for spans.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "200"}


def _clean_env() -> dict[str, str]:
    # The test process's own OTEL_* variables must not leak into the processes under test.
    return {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}


def _etcd(endpoint: str, work: Callable[[aetcd.Client], Awaitable[T]]) -> T:
    async def run() -> T:
        host, port = endpoint.rsplit(":", 1)
        async with aetcd.Client(host=host, port=int(port)) as client:
            return await work(client)

    return asyncio.run(run())


def etcd_read(endpoint: str, key: str) -> bytes | None:
    """The value of ``key``, read from etcd itself (not through the manager)."""

    async def read(client: aetcd.Client) -> bytes | None:
        found = await client.get(key.encode())
        return None if found is None else bytes(found.value)

    return _etcd(endpoint, read)


def register_models(endpoint: str, prefix: str, name: str, versions: int) -> None:
    """Model versions written straight to etcd: what the tests change is deployments and applications."""
    keys = Keys(prefix)
    signature = Signature(
        inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1])],
        outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1])],
    )
    artifact = Artifact(digest="sha256:" + "0" * 64, uri="file:///nowhere", size=0)

    async def put(client: aetcd.Client) -> None:
        for version in range(1, versions + 1):
            record = ModelVersion(name=name, version=version, runtime="python", artifact=artifact, signature=signature)
            await client.put(keys.model_version(name, version).encode(), record.model_dump_json().encode())

    _etcd(endpoint, put)


@contextmanager
def manager_api(etcd: str, prefix: str, work: Path, env: Mapping[str, str]) -> Iterator[str]:
    """`python -m manager_api` (no deployer) with ``env``, ready; yields its URL and stops it on exit."""
    port = free_port()
    argv = [sys.executable, "-m", "manager_api", "--etcd", etcd, "--prefix", prefix, "--port", str(port)]
    argv += ["--data-dir", str(work), "--log-level", "warning"]
    process = ChildProcess("manager_api", argv, env=env, log_path=work / "manager.log")
    url = f"http://127.0.0.1:{port}"
    try:
        process.start()
        process.wait_ready(lambda: http_ok(f"{url}/healthz"), 60)
        yield url
    finally:
        process.stop()


@dataclass
class Stack:
    url: str
    etcd: str
    prefix: str

    @property
    def api(self) -> str:
        return f"{self.url}/api/v1"


@pytest.fixture(scope="module")
def stack(etcd_server: EtcdServer, receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("config-traces")
    prefix = f"/hydro-config-traces-{uuid.uuid4().hex[:8]}/"
    xds_port, listen_port, admin_port = free_port(), free_port(), free_port()
    xds_argv = [sys.executable, "-m", "xds_control", "--etcd", etcd_server.endpoint, "--prefix", prefix]
    xds_argv += ["--port", str(xds_port), "--otlp-endpoint", receiver.endpoint]
    xds = ChildProcess("xds_control", xds_argv, env={**_clean_env(), **FAST_EXPORT}, log_path=work / "xds.log")
    ingress = ingress_envoy(work, admin_port=admin_port, xds_port=xds_port, listen_port=listen_port)
    manager_env = {**_clean_env(), **FAST_EXPORT, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{receiver.endpoint}"}
    try:
        xds.start()
        ingress.start()
        ingress.wait_ready(lambda: envoy_ready(admin_port), 30)
        register_models(etcd_server.endpoint, prefix, "traced", 2)
        with manager_api(etcd_server.endpoint, prefix, work, manager_env) as url:
            yield Stack(url, etcd_server.endpoint, prefix)
    finally:
        ingress.stop()
        xds.stop()
        print(xds.log_tail(20))


@pytest.fixture(autouse=True)
def fresh(receiver: OtlpReceiver) -> None:
    receiver.clear()


def _write_span(receiver: OtlpReceiver, route: str, name: str) -> ReceivedSpan:
    def found(spans: list[ReceivedSpan]) -> bool:
        return any(_is_write(s, route, name) for s in spans)

    spans = receiver.wait_for(found, 20, f"the manager span of {route} {name}")
    (span,) = [s for s in spans if _is_write(s, route, name)]
    return span


def _is_write(span: ReceivedSpan, route: str, name: str) -> bool:
    return span.service == "manager_api" and span.name == route and span.attributes.get("hydro.resource.name") == name


def _push_span(receiver: OtlpReceiver, what: str, matches: Callable[[ReceivedSpan], bool]) -> ReceivedSpan:
    def push(span: ReceivedSpan) -> bool:
        return span.service == "xds_control" and span.name == f"xds push {INGRESS}" and matches(span)

    spans = receiver.wait_for(lambda spans: any(push(s) for s in spans), 30, what)
    return next(s for s in spans if push(s))


def _stored(stack: Stack, key: str) -> dict[str, object]:
    found = etcd_read(stack.etcd, stack.prefix + key)
    assert found is not None, key
    value: dict[str, object] = json.loads(found)
    return value


def test_an_application_put_and_the_push_that_carries_it_share_a_trace(stack: Stack, receiver: OtlpReceiver) -> None:
    body = {"stages": [{"variants": [{"model": "traced", "version": 1, "weight": 100}]}]}
    response = httpx.put(f"{stack.api}/applications/shop", json=body, timeout=30)
    assert response.status_code == 200, response.text
    revision = response.json()["revision"]

    write = _write_span(receiver, "PUT /api/v1/applications/{name}", "shop")
    assert write.attributes["hydro.resource.kind"] == "applications"
    assert write.attributes["http.response.status_code"] == 200
    assert write.attributes["hydro.etcd.revision"] == revision
    assert not write.error
    # The record carries the write's context into etcd, where xds_control reads it.
    version, trace_id, span_id, _flags = str(_stored(stack, "applications/shop")["trace_context"]).split("-")
    assert (version, trace_id, span_id) == ("00", write.trace_id, write.span_id)

    push = _push_span(receiver, "the push of the application's routes", lambda s: s.trace_id == write.trace_id)
    assert push.parent_id == write.span_id
    assert push.attributes["hydro.xds.node_id"] == INGRESS
    assert push.attributes["hydro.etcd.revision"] >= revision
    assert push.attributes["hydro.xds.resources"] > 0
    assert push.attributes["hydro.xds.outcome"] == "acked", push.attributes
    assert push.attributes["hydro.xds.unacknowledged_types"] == ""


def test_a_deployment_write_continues_the_callers_trace(stack: Stack, receiver: OtlpReceiver) -> None:
    caller_trace, caller_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    headers = {"traceparent": f"00-{caller_trace}-{caller_span}-01"}
    body = {"replicas": 2, "policies": {"timeout_ms": 1234}}
    response = httpx.put(f"{stack.api}/deployments/traced/2", json=body, headers=headers, timeout=30)
    assert response.status_code == 200, response.text

    write = _write_span(receiver, "PUT /api/v1/deployments/{model}/{version}", "traced/2")
    assert (write.trace_id, write.parent_id) == (caller_trace, caller_span)
    assert write.attributes["hydro.etcd.revision"] == response.json()["revision"]
    assert _stored(stack, "deployments/traced/2")["trace_context"] == f"00-{caller_trace}-{write.span_id}-01"
    # The ingress gets the version's cluster once an application routes to it: its push joins that write's trace.
    app = {"stages": [{"variants": [{"model": "traced", "version": 2, "weight": 100}]}]}
    assert httpx.put(f"{stack.api}/applications/second", json=app, headers=headers, timeout=30).status_code == 200
    push = _push_span(receiver, "the push of the second application", lambda s: s.trace_id == caller_trace)
    assert push.attributes["hydro.xds.node_id"] == INGRESS


def test_a_rejected_write_is_a_span_naming_the_error_and_stores_nothing(stack: Stack, receiver: OtlpReceiver) -> None:
    body = {"stages": [{"variants": [{"model": "traced", "version": 1, "weight": 60}]}]}
    response = httpx.put(f"{stack.api}/applications/bad", json=body, timeout=30)
    assert response.status_code == 400, response.text
    message = response.json()["error"]
    assert "sum to 100" in message

    write = _write_span(receiver, "PUT /api/v1/applications/{name}", "bad")
    assert write.attributes["http.response.status_code"] == 400
    assert write.attributes["error.type"] == "400"
    assert write.attributes["hydro.error"] == message
    assert "hydro.etcd.revision" not in write.attributes
    assert etcd_read(stack.etcd, stack.prefix + "applications/bad") is None


def test_a_delete_is_traced_with_the_revision_its_push_reflects(stack: Stack, receiver: OtlpReceiver) -> None:
    body = {"stages": [{"variants": [{"model": "traced", "version": 1, "weight": 100}]}]}
    created = httpx.put(f"{stack.api}/applications/gone", json=body, timeout=30)
    assert created.status_code == 200, created.text
    # Its own push (not an earlier test's): else the delete could land in the same watch batch, and a batch that
    # changes nothing pushes nothing.
    created_at = created.json()["revision"]
    _push_span(
        receiver,
        "the push of the new application",
        lambda s: s.attributes.get("hydro.xds.writes", 0) > 0 and s.attributes["hydro.etcd.revision"] >= created_at,
    )
    response = httpx.delete(f"{stack.api}/applications/gone", timeout=30)
    assert response.status_code == 204, response.text

    write = _write_span(receiver, "DELETE /api/v1/applications/{name}", "gone")
    revision = write.attributes["hydro.etcd.revision"]
    # A delete leaves no record to carry its context: the push names the revision it reflects instead, the
    # delete's or a later one when the same watch batch also holds other writes (xds_control's own proxy statuses).
    push = _push_span(
        receiver, "the push without the application", lambda s: s.attributes["hydro.etcd.revision"] >= revision
    )
    assert push.attributes["hydro.xds.writes"] == 0


def test_reads_and_health_checks_make_no_spans(stack: Stack, receiver: OtlpReceiver) -> None:
    assert httpx.get(f"{stack.url}/healthz", timeout=10).status_code == 200
    assert httpx.get(f"{stack.api}/applications", timeout=10).status_code == 200
    assert httpx.put(f"{stack.api}/deployments/traced/1", json={"replicas": 0}, timeout=30).status_code == 200
    # Spans leave in the order they ended: once the write's span is in, the reads' would be too.
    _write_span(receiver, "PUT /api/v1/deployments/{model}/{version}", "traced/1")
    manager_spans = [s.name for s in receiver.spans() if s.service == "manager_api"]
    assert manager_spans and all(name.split()[0] in ("PUT", "POST", "PATCH", "DELETE") for name in manager_spans)


def test_a_manager_without_a_collector_stores_no_trace_context(
    etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path
) -> None:
    register_models(etcd_server.endpoint, etcd_prefix, "plain", 1)
    with manager_api(etcd_server.endpoint, etcd_prefix, tmp_path, _clean_env()) as url:
        headers = {"traceparent": f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"}
        response = httpx.put(f"{url}/api/v1/deployments/plain/1", json={"replicas": 0}, headers=headers, timeout=30)
        assert response.status_code == 200, response.text
    found = etcd_read(etcd_server.endpoint, etcd_prefix + "deployments/plain/1")
    assert found is not None
    assert "trace_context" not in json.loads(found)


def _snapshot(cluster: str) -> Snapshot:
    return Snapshot.build({CLUSTER: [(cluster, cluster_pb2.Cluster(name=cluster))]})


def test_a_nacked_push_is_an_error_span_naming_the_rejection(receiver: OtlpReceiver) -> None:
    """PushSpans in this process, exporting to the receiver: what a NACK and an ACK do to the push span."""
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{receiver.endpoint}", **FAST_EXPORT}
    tracing = setup_tracing("push-spans-test", environ=environ)
    write_trace, write_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    try:
        spans = PushSpans()
        node = NodeInfo.from_node(base_pb2.Node(id="sidecar~m~1"))
        first = _snapshot("a")
        spans.published(node, 7, None, first, [f"00-{write_trace}-{write_span}-01"], time.time_ns())
        version = first.versions[CLUSTER]
        spans.on_response(node.node_id, CLUSTER, version, 100, 1)
        spans.on_nack(node.node_id, CLUSTER, version, "bad cluster a")
        second = _snapshot("b")
        spans.published(node, 8, first, second, [], time.time_ns())
        spans.on_response(node.node_id, CLUSTER, second.versions[CLUSTER], 100, 1)
        # A NACK of the first version arriving late says nothing about the second push.
        spans.on_nack(node.node_id, CLUSTER, version, "late rejection of a")
        spans.on_ack(node.node_id, CLUSTER, second.versions[CLUSTER])
    finally:
        tracing.shutdown()

    def both(spans: list[ReceivedSpan]) -> bool:
        return len([s for s in spans if s.service == "push-spans-test"]) == 2

    pushes = {s.attributes["hydro.etcd.revision"]: s for s in receiver.wait_for(both, 20, "the two push spans")}
    nacked, acked = pushes[7], pushes[8]
    assert (nacked.trace_id, nacked.parent_id) == (write_trace, write_span)
    assert nacked.error and nacked.attributes["hydro.xds.outcome"] == "nacked"
    assert nacked.attributes["hydro.xds.node_id"] == "sidecar~m~1"
    assert nacked.attributes["hydro.xds.unacknowledged_types"] == "Cluster"
    assert not acked.error and acked.attributes["hydro.xds.outcome"] == "acked"
    assert acked.parent_id == ""
