"""xds_control notices etcd connections that went silent (a dead network path: nothing refused, nothing
answered): its watch follows etcd again within a bound and its proxy status records are written again. A real
etcd, xds_control and ingress Envoy, and a TCP proxy between xds_control and etcd that blackholes what it carries."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aetcd
from blackhole_proxy import BlackholeProxy
from test_ingress_envoy import Ingress, _app, _model, _put, ingress_stack

from manager_api.etcd_server import EtcdServer
from manager_api.processes import wait_until
from protos.topology.keys import Keys
from protos.topology.proxies import ProxyStatus

#: xds_control's bound (--etcd-watch-timeout): a watch that brings nothing for this long is started again.
WATCH_TIMEOUT_S = 2.0


def test_a_blackholed_etcd_connection_is_noticed_and_the_watch_recovers(
    etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path
) -> None:
    keys = Keys(etcd_prefix)
    host, port = etcd_server.endpoint.split(":")
    with (
        BlackholeProxy(host, int(port)) as proxy,
        ingress_stack(
            etcd_server,
            etcd_prefix,
            tmp_path,
            "GRPC",
            etcd_endpoint=proxy.endpoint,
            extra_args=("--etcd-watch-timeout", str(WATCH_TIMEOUT_S)),
        ) as ingress,
    ):

        def route_names() -> set[str]:
            return {r["name"] for c in ingress.dynamic("Routes") for r in c["virtual_hosts"][0]["routes"]}

        records = {keys.model_version("m", 1): _model("m", 1), keys.application("shop"): _app("shop", [("m", 1, 100)])}
        asyncio.run(_put(etcd_server.endpoint, records))
        wait_until(lambda: "app|shop|rest" in route_names(), 10, "the application through the proxy")

        assert proxy.blackhole() >= 1, "xds_control reaches etcd through the proxy"
        blackholed_at = time.monotonic()
        # Written straight to etcd, which is fine: only xds_control's path to it is dead.
        asyncio.run(_put(etcd_server.endpoint, {keys.application("later"): _app("later", [("m", 1, 100)])}))
        # The bound: the watch timeout to notice, then a new connection and a full read (room for a loaded machine).
        wait_until(
            lambda: "app|later|rest" in route_names(), 10 * WATCH_TIMEOUT_S, "the record written after the outage"
        )
        recovered_in = time.monotonic() - blackholed_at
        log = ingress.xds_log.read_text()
        assert log.count("etcd watch stalled") == 1, "one warning for the outage"
        assert "etcd watch answers again" in log
        print(f"recovered {recovered_in:.1f} s after the blackhole")

        # The proxy status records (written on another connection, leased for 10 s) follow too: the writer's
        # calls on the dead connection give up after the lease's TTL, and it writes again on a new connection.
        def acked_routes() -> str | None:
            status = asyncio.run(_proxy_status(etcd_server.endpoint, keys.proxy("ingress")))
            return None if status is None else status.acked.get("RouteConfiguration")

        wait_until(lambda: acked_routes() == _route_version(ingress), 45, "proxies/ingress naming Envoy's routes")
        print(f"status recovered {time.monotonic() - blackholed_at:.1f} s after the blackhole")


async def _proxy_status(endpoint: str, key: str) -> ProxyStatus | None:
    host, port = endpoint.split(":")
    async with aetcd.Client(host=host, port=int(port)) as client:
        found = await client.get(key.encode())
    return None if found is None else ProxyStatus.model_validate_json(bytes(found.value))


def _route_version(ingress: Ingress) -> str:
    for config in ingress.config_dump()["configs"]:
        if config["@type"].endswith(".RoutesConfigDump"):
            return str(config["dynamic_route_configs"][0]["version_info"])
    raise AssertionError("Envoy has no dynamic routes")
