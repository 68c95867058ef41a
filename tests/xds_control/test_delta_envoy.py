"""Delta ADS against a real ingress Envoy (bootstrap ``api_type: DELTA_GRPC``): etcd changes reach Envoy one resource
at a time, traffic passes, removal works.

The upstream is an in-process gRPC server (HTTP/2, as the model clusters speak) that names itself in its answer,
so the test can tell which endpoint served a call. Shared setup comes from test_ingress_envoy.py, whose own tests
run under both ADS flavours.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import aetcd
import grpc
import httpx
import pytest
from refusing_xds_control import REFUSED_APP
from test_ingress_envoy import Ingress, _app, _model, _put, ingress_stack

from manager_api.etcd_server import EtcdServer
from manager_api.processes import wait_until
from protos.topology.deployments import Deployment
from protos.topology.instances import Instance
from protos.topology.keys import Keys

INFER = "/inference.GRPCInferenceService/ModelInfer"
#: xds_control with an injected fault: the NACK tests' trigger (no etcd record makes Envoy refuse anything).
REFUSING_XDS_CONTROL = (str(Path(__file__).with_name("refusing_xds_control.py")),)


def _no_route(path: str) -> str:
    """The ingress's OIP error for a REST path no route matches (written out: the test states the contract)."""
    return f"no application or deployed model version matches {path}; the manager's GET /api/v1/applications lists them"


class Upstream:
    """A gRPC server answering ModelInfer with ``served-by:PORT`` (raw bytes: Envoy does not parse them)."""

    def __init__(self) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        handler = grpc.unary_unary_rpc_method_handler(self._infer, request_deserializer=None, response_serializer=None)
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {"ModelInfer": handler}),)
        )
        self.server.start()

    def _infer(self, request: bytes, context: Any) -> bytes:
        return f"served-by:{self.port}".encode()

    def stop(self) -> None:
        self.server.stop(grace=None).wait()


@pytest.fixture
def upstreams() -> Iterator[list[Upstream]]:
    servers = [Upstream(), Upstream()]
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def refusing_delta_stack(etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path) -> Iterator[Ingress]:
    """As delta_stack, with xds_control's INJECTED route refusal (refusing_xds_control.py)."""
    with ingress_stack(etcd_server, etcd_prefix, tmp_path, "DELTA_GRPC", REFUSING_XDS_CONTROL) as ingress:
        yield ingress


@pytest.fixture
def delta_stack(etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path) -> Iterator[Ingress]:
    with ingress_stack(etcd_server, etcd_prefix, tmp_path, "DELTA_GRPC") as ingress:
        yield ingress


def _instance(keys: Keys, instance_id: str, port: int) -> dict[str, str]:
    record = Instance(model="m", version=1, id=instance_id, node="n", address="127.0.0.1", port=port)
    return {keys.instance("m", 1, instance_id): record.model_dump_json()}


async def _delete(endpoint: str, key: str) -> None:
    host, port = endpoint.split(":")
    client = aetcd.Client(host=host, port=int(port))
    await client.connect()
    try:
        await client.delete(key.encode())
    finally:
        await client.close()


def _infer(ingress: Ingress, app: str) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{ingress.listen_port}") as channel:
        call = channel.unary_unary(INFER)
        answer: bytes = call(b"", timeout=5, metadata=(("x-hydro-model", app),))
        return answer.decode()


def _delta_pushes(ingress: Ingress, kind: str) -> list[tuple[int, int]]:
    """(resources, removed) of every delta response of one kind xds_control logged, in order."""
    pattern = re.compile(rf"<- delta {kind} nonce=\S+ resources=(\d+) removed=(\d+)")
    return [(int(m[1]), int(m[2])) for m in pattern.finditer(ingress.xds_log.read_text())]


def test_delta_envoy_follows_etcd_one_resource_at_a_time(
    etcd_server: EtcdServer, etcd_prefix: str, delta_stack: Ingress, upstreams: list[Upstream]
) -> None:
    ingress = delta_stack
    keys = Keys(etcd_prefix)
    first, second = upstreams
    assert "connected (DeltaAdsStream)" in ingress.xds_log.read_text(), "Envoy speaks delta ADS"
    asyncio.run(
        _put(
            etcd_server.endpoint,
            {
                keys.model_version("m", 1): _model("m", 1),
                keys.deployment("m", 1): Deployment(model="m", version=1, replicas=1).model_dump_json(),
                **_instance(keys, "i1", first.port),
                keys.application("shop"): _app("shop", [("m", 1, 100)]),
            },
        )
    )
    wait_until(lambda: "model|m|1" in ingress.cluster_names(), 10, "cluster from etcd in Envoy")
    wait_until(
        lambda: any(
            r["name"] == "app|shop|grpc" for c in ingress.dynamic("Routes") for r in c["virtual_hosts"][0]["routes"]
        ),
        10,
        "application route in Envoy",
    )
    wait_until(lambda: _infer(ingress, "shop") == f"served-by:{first.port}", 10, "a call through the ingress")

    # One more endpoint: exactly one resource (the cluster's ClusterLoadAssignment) goes to Envoy.
    before = len(_delta_pushes(ingress, "ClusterLoadAssignment"))
    clusters_before = _delta_pushes(ingress, "Cluster")
    asyncio.run(_put(etcd_server.endpoint, _instance(keys, "i2", second.port)))
    wait_until(
        lambda: ingress.endpoints("model|m|1") == {f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}"},
        10,
        "second endpoint in Envoy",
    )
    assert _delta_pushes(ingress, "ClusterLoadAssignment")[before:] == [(1, 0)]
    assert _delta_pushes(ingress, "Cluster") == clusters_before, "an endpoint change sends no cluster"
    wait_until(
        lambda: {_infer(ingress, "shop") for _ in range(6)} == {f"served-by:{p.port}" for p in upstreams},
        10,
        "calls reach both endpoints",
    )

    # Removal: the application goes, then its cluster; the ingress answers 404 for it.
    mark = len(ingress.xds_log.read_text())
    asyncio.run(_delete(etcd_server.endpoint, keys.application("shop")))
    asyncio.run(_delete(etcd_server.endpoint, keys.deployment("m", 1)))
    wait_until(lambda: "model|m|1" not in ingress.cluster_names(), 10, "cluster removal")
    removed = httpx.post(f"{ingress.url}/v2/models/shop/infer", json={})
    assert removed.status_code == 404
    assert removed.json() == {"error": _no_route("/v2/models/shop/infer")}
    pushes = re.findall(r"<- delta (\w+) nonce=\S+ resources=(\d+) removed=(\d+)", ingress.xds_log.read_text()[mark:])
    # Two clusters go: the model version's and the server-level one over every deployed version (any|ready).
    assert pushes[:2] == [("RouteConfiguration", "1", "0"), ("Cluster", "0", "2")], (
        "routes stop naming the clusters first; then the clusters alone are announced removed"
    )


def test_delta_envoy_keeps_serving_across_a_control_plane_restart_and_gets_nothing_it_has(
    etcd_server: EtcdServer, etcd_prefix: str, delta_stack: Ingress, upstreams: list[Upstream]
) -> None:
    ingress = delta_stack
    keys = Keys(etcd_prefix)
    first, second = upstreams
    asyncio.run(
        _put(
            etcd_server.endpoint,
            {
                keys.model_version("m", 1): _model("m", 1),
                **_instance(keys, "i1", first.port),
                keys.application("shop"): _app("shop", [("m", 1, 100)]),
            },
        )
    )
    wait_until(lambda: _infer(ingress, "shop") == f"served-by:{first.port}", 10, "a call through the ingress")

    mark = len(ingress.xds_log.read_text())
    ingress.restart_control_plane()
    assert _infer(ingress, "shop") == f"served-by:{first.port}", "Envoy serves on while xds_control is away"

    def reconnected() -> list[str]:
        """Types the reconnected Envoy asked for, telling the versions it holds."""
        return re.findall(r"-> delta (\w+) nonce= \S+ -0 initial=[1-9]", ingress.xds_log.read_text()[mark:])

    wait_until(
        lambda: sorted(reconnected()) == ["Cluster", "ClusterLoadAssignment", "Listener", "RouteConfiguration"],
        15,
        "Envoy back on the restarted control plane, telling what it holds",
    )
    # Once the new process has read etcd, a change reaches Envoy: the first response after the reconnect is
    # that change alone, so nothing Envoy already had was sent again.
    asyncio.run(_put(etcd_server.endpoint, _instance(keys, "i2", second.port)))
    wait_until(
        lambda: ingress.endpoints("model|m|1") == {f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}"},
        15,
        "the change after the restart in Envoy",
    )
    pushes = re.findall(r"<- delta (\w+) nonce=\S+ resources=(\d+) removed=(\d+)", ingress.xds_log.read_text()[mark:])
    assert pushes == [("ClusterLoadAssignment", "1", "0")]
    assert _infer(ingress, "shop").startswith("served-by:")


def test_delta_envoy_nack_is_not_looped_and_the_fix_is_accepted(
    etcd_server: EtcdServer, etcd_prefix: str, refusing_delta_stack: Ingress, upstreams: list[Upstream]
) -> None:
    ingress = refusing_delta_stack
    keys = Keys(etcd_prefix)
    first = upstreams[0]
    asyncio.run(
        _put(
            etcd_server.endpoint,
            {
                keys.model_version("m", 1): _model("m", 1),
                **_instance(keys, "i1", first.port),
                keys.application("shop"): _app("shop", [("m", 1, 100)]),
            },
        )
    )
    wait_until(lambda: _infer(ingress, "shop") == f"served-by:{first.port}", 10, "a call through the ingress")

    # INJECTED: while an application named 'refused' exists, xds_control sends routes Envoy rejects.
    mark = len(ingress.xds_log.read_text())
    asyncio.run(_put(etcd_server.endpoint, {keys.application(REFUSED_APP): _app(REFUSED_APP, [("m", 1, 100)])}))
    wait_until(lambda: "rejected RouteConfiguration" in ingress.xds_log.read_text()[mark:], 10, "the NACK")
    for _ in range(10):
        assert _infer(ingress, "shop") == f"served-by:{first.port}", "the last good routes keep serving"
    log = ingress.xds_log.read_text()[mark:]
    assert "wildcard" in log, "Envoy refused the injected virtual host"
    assert log.count("<- delta RouteConfiguration") == 1, "the rejected version is not sent again"
    assert log.count("rejected ") == 1

    # The fix (the injection over, another application added) is the next version: sent and accepted.
    asyncio.run(_delete(etcd_server.endpoint, keys.application(REFUSED_APP)))
    asyncio.run(_put(etcd_server.endpoint, {keys.application("paused"): _app("paused", [("m", 1, 100)])}))
    wait_until(lambda: _infer(ingress, "paused") == f"served-by:{first.port}", 10, "the fixed application in Envoy")
    assert ingress.xds_log.read_text()[mark:].count("rejected ") == 1
