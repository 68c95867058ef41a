"""xds_control against a real ingress Envoy: what etcd says is what Envoy loads (read from /config_dump)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import aetcd
import grpc
import httpx
import pytest

from manager_api.etcd_server import EtcdServer
from manager_api.ports import free_port
from manager_api.processes import ChildProcess, wait_until
from protos.topology.applications import Application, Stage, Variant
from protos.topology.deployments import Deployment
from protos.topology.instances import Instance
from protos.topology.keys import Keys
from protos.topology.models import Artifact, ModelVersion, Signature, TensorSpec
from protos.topology.policies import CircuitBreakerPolicy, Policies
from xds_control.bootstrap import envoy_ready, ingress_envoy


def _no_route(path: str) -> str:
    """The ingress's OIP error for a REST path no route matches (written out: the test states the contract)."""
    return f"no application or deployed model version matches {path}; the manager's GET /api/v1/applications lists them"


class Restart(Protocol):
    """Stops xds_control, calls ``meanwhile`` (if given) while it is away, and starts it again."""

    def __call__(self, meanwhile: Callable[[], None] | None = None) -> None: ...


def _no_restart(meanwhile: Callable[[], None] | None = None) -> None:
    """The Restart of an Ingress not built by ingress_stack."""


class Ingress:
    def __init__(self, listen_port: int, admin_port: int, api_type: str, xds_log: Path) -> None:
        self.url = f"http://127.0.0.1:{listen_port}"
        self.listen_port = listen_port
        self.admin_port = admin_port
        self.api_type = api_type
        self.xds_log = xds_log
        self.restart_control_plane: Restart = _no_restart

    def config_dump(self) -> dict[str, Any]:
        result: dict[str, Any] = httpx.get(f"http://127.0.0.1:{self.admin_port}/config_dump").json()
        return result

    def dynamic(self, kind: str) -> list[dict[str, Any]]:
        """Active dynamic resources of one kind (clusters, route_configs, listeners) as Envoy holds them."""
        for config in self.config_dump()["configs"]:
            if config["@type"].endswith(f".{kind}ConfigDump"):
                if kind == "Clusters":
                    return [c["cluster"] for c in config.get("dynamic_active_clusters", [])]
                if kind == "Routes":
                    return [c["route_config"] for c in config.get("dynamic_route_configs", [])]
        return []

    def cluster_names(self) -> set[str]:
        return {c["name"] for c in self.dynamic("Clusters")}

    def endpoints(self, cluster: str) -> set[str]:
        """HOST:PORT of the cluster's endpoints as Envoy has them (admin /clusters)."""
        text = httpx.get(f"http://127.0.0.1:{self.admin_port}/clusters").text
        hosts = set()
        for line in text.splitlines():
            name, _, rest = line.partition("::")
            host = rest.split("::")[0]
            if name == cluster and ":" in host:  # HOST:PORT, not a cluster-wide line such as default_priority
                hosts.add(host)
        return hosts


@pytest.fixture(params=["GRPC", "DELTA_GRPC"])
def stack(
    request: pytest.FixtureRequest, etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path
) -> Iterator[Ingress]:
    """xds_control and an ingress Envoy speaking state-of-the-world or delta ADS to it."""
    with ingress_stack(etcd_server, etcd_prefix, tmp_path, request.param) as ingress:
        yield ingress


#: How the control plane is started: ``python -m xds_control``.
XDS_CONTROL = ("-m", "xds_control")


@contextlib.contextmanager
def ingress_stack(
    etcd_server: EtcdServer,
    etcd_prefix: str,
    tmp_path: Path,
    api_type: str,
    program: Sequence[str] = XDS_CONTROL,
    etcd_endpoint: str | None = None,
    extra_args: Sequence[str] = (),
) -> Iterator[Ingress]:
    """Start xds_control (``program``: the interpreter's arguments before xds_control's own; it reaches etcd at
    ``etcd_endpoint``, by default the server's own), then an ingress Envoy with ``api_type`` ADS; stop both on exit."""
    xds_port = free_port()
    log = tmp_path / "xds.log"
    argv = [sys.executable, *program, "--etcd", etcd_endpoint or etcd_server.endpoint, "--prefix", etcd_prefix]
    argv += ["--port", str(xds_port), "--log-level", "DEBUG", *extra_args]
    control_planes: list[ChildProcess] = []

    def start_control_plane() -> None:
        # One log for every run, so that a test can read what happened across a restart.
        control_planes.append(ChildProcess("xds_control", argv, log_path=log).start())

    def restart_control_plane(meanwhile: Callable[[], None] | None = None) -> None:
        control_planes[-1].stop()
        if meanwhile is not None:
            meanwhile()
        start_control_plane()

    listen_port, admin_port = free_port(), free_port()
    envoy = ingress_envoy(
        tmp_path, admin_port=admin_port, xds_port=xds_port, listen_port=listen_port, ads_api_type=api_type
    )
    try:
        start_control_plane()
        envoy.start()
        envoy.wait_ready(lambda: envoy_ready(admin_port), 30)
        stream = "DeltaAdsStream" if api_type == "DELTA_GRPC" else "AdsStream"
        wait_until(lambda: f"connected ({stream})" in log.read_text(), 10, f"Envoy on a {api_type} stream")
        ingress = Ingress(listen_port, admin_port, api_type, log)
        ingress.restart_control_plane = restart_control_plane
        yield ingress
    finally:
        envoy.stop()
        for process in control_planes:
            process.stop()
        if control_planes:
            print(control_planes[-1].log_tail(60))


SIGNATURE = Signature(
    inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 4])],
    outputs=[TensorSpec(name="y", datatype="INT64", shape=[-1])],
)


async def _put(endpoint: str, records: dict[str, str]) -> None:
    host, port = endpoint.split(":")
    client = aetcd.Client(host=host, port=int(port))
    await client.connect()
    try:
        for key, value in records.items():
            await client.put(key.encode(), value.encode())
    finally:
        await client.close()


def _model(name: str, version: int) -> str:
    artifact = Artifact(digest="sha256:" + "0" * 64, uri="file:///nowhere", size=0)
    return ModelVersion(
        name=name, version=version, runtime="sklearn", artifact=artifact, signature=SIGNATURE
    ).model_dump_json()


def _app(name: str, variants: list[tuple[str, int, int]]) -> str:
    stage = Stage(variants=[Variant(model=m, version=v, weight=w) for m, v, w in variants])
    return Application(name=name, stages=[stage]).model_dump_json()


def test_application_routes_and_clusters_reach_envoy(etcd_server: EtcdServer, etcd_prefix: str, stack: Ingress) -> None:
    keys = Keys(etcd_prefix)
    dead_port = free_port()
    assert stack.cluster_names() == set(), "nothing is served before etcd says so"
    asyncio.run(
        _put(
            etcd_server.endpoint,
            {
                keys.model_version("m", 1): _model("m", 1),
                keys.model_version("m", 2): _model("m", 2),
                keys.deployment("m", 1): Deployment(model="m", version=1, replicas=1).model_dump_json(),
                keys.instance("m", 1, "i1"): Instance(
                    model="m", version=1, id="i1", node="n", address="127.0.0.1", port=dead_port
                ).model_dump_json(),
                keys.application("shop"): _app("shop", [("m", 1, 30), ("m", 2, 70)]),
            },
        )
    )

    def routes() -> dict[str, Any]:
        configs = stack.dynamic("Routes")
        return {route["name"]: route for c in configs for route in c["virtual_hosts"][0]["routes"]}

    wait_until(lambda: "app|shop|rest" in routes(), 10, "application route in Envoy")
    assert {"model|m|1", "model|m|2"} <= stack.cluster_names()
    by_name = routes()
    weights = {c["name"]: c["weight"] for c in by_name["app|shop|rest"]["route"]["weighted_clusters"]["clusters"]}
    assert weights == {"model|m|1": 30, "model|m|2": 70}
    assert "model|m|1" in by_name

    # Envoy's own errors are OIP errors: JSON for REST, a gRPC status for gRPC.
    unknown = httpx.post(f"{stack.url}/v2/models/nope/infer", json={})
    assert unknown.status_code == 404
    assert unknown.headers["content-type"] == "application/json"
    assert unknown.json() == {"error": _no_route("/v2/models/nope/infer")}
    down = httpx.post(f"{stack.url}/v2/models/m/versions/2/infer", json={})
    assert down.status_code == 404, "version 2 is not deployed: only applications route to it"
    assert down.json() == {
        "error": "no deployed model version matches /v2/models/m/versions/2/infer (an application has no versions: "
        "/v2/models/{app}/infer addresses one); the manager's GET /api/v1/deployments lists the deployed versions"
    }
    unreachable = httpx.post(f"{stack.url}/v2/models/m/versions/1/infer", json={})
    assert unreachable.status_code == 503
    assert unreachable.headers["content-type"] == "application/json"
    # Envoy's reason, in the OIP error body: the one instance of m:1 refuses connections (retried first).
    assert unreachable.json()["error"].endswith("retried and the latest reset reason: remote connection failure")

    channel = grpc.insecure_channel(f"127.0.0.1:{stack.listen_port}")
    try:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as no_header:
            call(b"", timeout=5)
        # An empty body names no model (header-less routing reads the request's model_name).
        assert no_header.value.code() == grpc.StatusCode.NOT_FOUND
        assert "model_name" in (no_header.value.details() or "")
        with pytest.raises(grpc.RpcError) as no_endpoint:
            call(b"", timeout=5, metadata=(("x-hydro-model", "shop"),))
        assert no_endpoint.value.code() == grpc.StatusCode.UNAVAILABLE
        # shop sends 30 % to m:1 (its instance refuses connections) and 70 % to m:2 (no instance at all).
        details = no_endpoint.value.details() or ""
        assert details.startswith("no healthy upstream: no ready replica of model version m:2") or details.endswith(
            "remote connection failure"
        ), details
    finally:
        channel.close()


def test_removed_application_leaves_envoy(etcd_server: EtcdServer, etcd_prefix: str, stack: Ingress) -> None:
    keys = Keys(etcd_prefix)
    asyncio.run(
        _put(
            etcd_server.endpoint,
            {
                keys.model_version("k", 1): _model("k", 1),
                keys.application("gone"): _app("gone", [("k", 1, 100)]),
            },
        )
    )
    wait_until(lambda: "model|k|1" in stack.cluster_names(), 10, "cluster of the application")

    async def delete() -> None:
        host, port = etcd_server.endpoint.split(":")
        client = aetcd.Client(host=host, port=int(port))
        await client.connect()
        await client.delete(keys.application("gone").encode())
        await client.close()

    asyncio.run(delete())
    wait_until(lambda: "model|k|1" not in stack.cluster_names(), 10, "cluster removal")
    gone = httpx.post(f"{stack.url}/v2/models/gone/infer", json={})
    assert gone.status_code == 404
    assert gone.json() == {"error": _no_route("/v2/models/gone/infer")}


def test_one_unusable_record_does_not_stop_pushes_for_the_others(
    etcd_server: EtcdServer, etcd_prefix: str, stack: Ingress
) -> None:
    keys = Keys(etcd_prefix)

    def instance(instance_id: str, address: str, port: int) -> str:
        return Instance(model="m", version=1, id=instance_id, node="n", address=address, port=port).model_dump_json()

    good_port = free_port()
    asyncio.run(
        _put(
            etcd_server.endpoint,
            {
                keys.model_version("m", 1): _model("m", 1),
                keys.application("shop"): _app("shop", [("m", 1, 100)]),
                keys.instance("m", 1, "good"): instance("good", "127.0.0.1", good_port),
                # Valid JSON of the schema, yet no endpoint: a host name (EDS takes IP addresses only), no port.
                keys.instance("m", 1, "named"): instance("named", "node-1.example", 7001),
                keys.instance("m", 1, "negative"): instance("negative", "127.0.0.1", -1),
            },
        )
    )
    wait_until(lambda: stack.endpoints("model|m|1") == {f"127.0.0.1:{good_port}"}, 10, "the good endpoint")
    asyncio.run(_put(etcd_server.endpoint, {keys.application("later"): _app("later", [("m", 1, 100)])}))
    wait_until(
        lambda: any(
            r["name"] == "app|later|rest" for c in stack.dynamic("Routes") for r in c["virtual_hosts"][0]["routes"]
        ),
        10,
        "a later application's route",
    )
    assert "rejected" not in stack.xds_log.read_text(), "nothing was sent that Envoy had to reject"


def test_cluster_changed_while_the_control_plane_was_away_warms_and_routes_follow(
    etcd_server: EtcdServer, etcd_prefix: str, stack: Ingress
) -> None:
    keys = Keys(etcd_prefix)

    def deployment(max_requests: int) -> str:
        policies = Policies(circuit_breaker=CircuitBreakerPolicy(max_requests=max_requests))
        return Deployment(model="m", version=1, replicas=1, policies=policies).model_dump_json()

    def route_names() -> set[str]:
        return {route["name"] for c in stack.dynamic("Routes") for route in c["virtual_hosts"][0]["routes"]}

    def max_requests() -> int | None:
        for cluster in stack.dynamic("Clusters"):
            if cluster["name"] == "model|m|1":
                return int(cluster["circuit_breakers"]["thresholds"][0]["max_requests"])
        return None

    instance = Instance(model="m", version=1, id="i1", node="n", address="127.0.0.1", port=free_port())
    asyncio.run(
        _put(
            etcd_server.endpoint,
            {
                keys.model_version("m", 1): _model("m", 1),
                keys.deployment("m", 1): deployment(100),
                keys.instance("m", 1, "i1"): instance.model_dump_json(),
                keys.application("shop"): _app("shop", [("m", 1, 100)]),
            },
        )
    )
    wait_until(lambda: "app|shop|rest" in route_names() and max_requests() == 100, 10, "the first config in Envoy")

    # While xds_control is down, the cluster changes (its endpoints do not) and a new application routes to it.
    changes = {keys.deployment("m", 1): deployment(200), keys.application("later"): _app("later", [("m", 1, 100)])}
    mark = len(stack.xds_log.read_text())
    stack.restart_control_plane(lambda: asyncio.run(_put(etcd_server.endpoint, changes)))
    # Envoy reconnects on its own back-off (0.5 s doubling), which a slow restart on a loaded machine stretches; the
    # bound that matters is from the reconnect: without the fix the cluster warms only when Envoy's initial fetch
    # timeout (15 s) ends its wait for endpoints.
    stream = "DeltaAdsStream" if stack.api_type == "DELTA_GRPC" else "AdsStream"
    wait_until(lambda: f"connected ({stream})" in stack.xds_log.read_text()[mark:], 30, "Envoy reconnected")
    wait_until(lambda: max_requests() == 200, 10, "the changed cluster warm (its endpoints answered)")
    wait_until(lambda: "app|later|rest" in route_names(), 10, "the new application's route")


def _route_names(stack: Ingress) -> set[str]:
    return {route["name"] for c in stack.dynamic("Routes") for route in c["virtual_hosts"][0]["routes"]}


def test_records_envoy_would_refuse_are_left_out_one_key_at_a_time(
    etcd_server: EtcdServer, etcd_prefix: str, stack: Ingress
) -> None:
    keys = Keys(etcd_prefix)
    asyncio.run(
        _put(
            etcd_server.endpoint,
            {
                keys.model_version("m", 1): _model("m", 1),
                keys.application("shop"): _app("shop", [("m", 1, 100)]),
                # Written past the manager's checks (etcdctl): every one of these made Envoy reject the whole
                # route configuration, so no route change reached the ingress while it existed.
                keys.application("paused"): _app("paused", [("m", 1, 0)]),
                keys.application("bad?name"): _app("bad?name", [("m", 1, 100)]),
                keys.deployment("m?x", 1): Deployment(model="m?x", version=1, replicas=1).model_dump_json(),
            },
        )
    )
    wait_until(lambda: "app|shop|rest" in _route_names(stack), 10, "the good application's route")
    asyncio.run(_put(etcd_server.endpoint, {keys.application("later"): _app("later", [("m", 1, 100)])}))
    wait_until(lambda: "app|later|rest" in _route_names(stack), 10, "a later application's route")
    assert not {"app|paused|rest", "app|bad?name|rest"} & _route_names(stack)
    log = stack.xds_log.read_text()
    assert "rejected" not in log, "nothing was sent that Envoy had to reject"
    assert f"ignoring {keys.application('paused')}: stage 1: variant weights sum to 0" in log


def test_an_invalid_value_keeps_the_application_envoy_has_until_a_good_one_comes(
    etcd_server: EtcdServer, etcd_prefix: str, stack: Ingress
) -> None:
    keys = Keys(etcd_prefix)

    def weights() -> dict[str, int]:
        for c in stack.dynamic("Routes"):
            for route in c["virtual_hosts"][0]["routes"]:
                if route["name"] == "app|shop|rest":
                    action = route["route"]
                    if "cluster" in action:
                        return {action["cluster"]: 100}
                    return {w["name"]: w["weight"] for w in action["weighted_clusters"]["clusters"]}
        return {}

    asyncio.run(
        _put(
            etcd_server.endpoint,
            {
                keys.model_version("m", 1): _model("m", 1),
                keys.model_version("m", 2): _model("m", 2),
                keys.application("shop"): _app("shop", [("m", 1, 100)]),
            },
        )
    )
    wait_until(lambda: weights() == {"model|m|1": 100}, 10, "the application in Envoy")

    # A typo written with etcdctl: not a valid record. The application Envoy has must stay.
    typo = '{"schema_version": 1, "name": "shop", "stages": [{"varaints": [{"model": "m", "version": 2}]}]}'
    asyncio.run(_put(etcd_server.endpoint, {keys.application("shop"): typo}))
    # A later change is pushed: the state after the typo has reached Envoy.
    asyncio.run(_put(etcd_server.endpoint, {keys.application("later"): _app("later", [("m", 1, 100)])}))
    wait_until(lambda: "app|later|rest" in _route_names(stack), 10, "a later application's route")
    assert weights() == {"model|m|1": 100}, "the last good value of the key is still served"
    assert httpx.post(f"{stack.url}/v2/models/shop/infer", json={}).status_code != 404
    assert f"ignoring {keys.application('shop')}: not a valid record" in stack.xds_log.read_text()

    # The corrected value applies.
    asyncio.run(_put(etcd_server.endpoint, {keys.application("shop"): _app("shop", [("m", 1, 50), ("m", 2, 50)])}))
    wait_until(lambda: weights() == {"model|m|1": 50, "model|m|2": 50}, 10, "the corrected application in Envoy")
