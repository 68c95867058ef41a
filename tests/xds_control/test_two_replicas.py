"""Two xds_control replicas behind the same etcd give proxies identical versions for the same state.

Versions are content hashes of deterministic serializations, so a proxy that reconnects to another replica is
told nothing new. Checked with two real processes and two real Envoys, one on each.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import aetcd
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
from protos.topology.proxies import ProxyStatus
from xds_control.bootstrap import envoy_ready, ingress_envoy

SIGNATURE = Signature(
    inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1])],
    outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1])],
)


@pytest.fixture
def two_replicas(etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path) -> Iterator[list[int]]:
    """Two xds_control processes, each with an ingress Envoy; yields the Envoys' admin ports."""
    processes: list[ChildProcess] = []
    admin_ports: list[int] = []
    # Both Envoys describe themselves identically (same listener port: Envoy binds with SO_REUSEPORT), so the
    # two replicas must compute identical snapshots for them.
    listen_port = free_port()
    try:
        for name in ("a", "b"):
            xds_port, admin_port = free_port(), free_port()
            processes.append(
                ChildProcess(
                    f"xds-{name}",
                    [
                        *(sys.executable, "-m", "xds_control", "--etcd", etcd_server.endpoint),
                        *("--prefix", etcd_prefix, "--port", str(xds_port)),
                    ],
                    log_path=tmp_path / f"xds-{name}.log",
                ).start()
            )
            envoy = ingress_envoy(
                tmp_path / name,
                admin_port=admin_port,
                xds_port=xds_port,
                listen_port=listen_port,
                node_id=f"ingress-{name}",
            ).start()
            admin_ports.append(admin_port)
            processes.append(envoy)
            envoy.wait_ready(lambda port=admin_port: envoy_ready(port), 30)  # type: ignore[misc]
        yield admin_ports
    finally:
        for process in reversed(processes):
            process.stop()


def _records(keys: Keys) -> dict[str, str]:
    artifact = Artifact(digest="sha256:" + "0" * 64, uri="file:///nowhere", size=0)
    records = {}
    for version in (1, 2):
        model = ModelVersion(name="m", version=version, runtime="python", artifact=artifact, signature=SIGNATURE)
        records[keys.model_version("m", version)] = model.model_dump_json()
        records[keys.deployment("m", version)] = Deployment(model="m", version=version, replicas=2).model_dump_json()
        for index in range(2):
            instance = Instance(
                model="m", version=version, id=f"i{version}{index}", node="n", address="127.0.0.1", port=20000 + index
            )
            records[keys.instance("m", version, instance.id)] = instance.model_dump_json()
    variants = [Variant(model="m", version=1, weight=40), Variant(model="m", version=2, weight=60)]
    app = Application(name="shop", stages=[Stage(variants=variants)])
    records[keys.application("shop")] = app.model_dump_json()
    return records


def test_replicas_hand_out_identical_versions(
    etcd_server: EtcdServer, etcd_prefix: str, two_replicas: list[int]
) -> None:
    keys = Keys(etcd_prefix)
    host, port = etcd_server.endpoint.rsplit(":", 1)

    async def write() -> None:
        async with aetcd.Client(host=host, port=int(port)) as client:
            for key, value in _records(keys).items():
                await client.put(key.encode(), value.encode())

    async def statuses() -> dict[str, ProxyStatus]:
        async with aetcd.Client(host=host, port=int(port)) as client:
            result = await client.get_prefix(keys.proxies().encode())
            return {kv.key.decode().rsplit("/", 1)[1]: ProxyStatus.model_validate_json(kv.value) for kv in result}

    asyncio.run(write())

    def routes_shop(admin_port: int) -> bool:
        return "app|shop|rest" in httpx.get(f"http://127.0.0.1:{admin_port}/config_dump").text

    def both_hold_the_whole_state() -> bool:
        found = asyncio.run(statuses())
        return (
            set(found) == {"ingress-a", "ingress-b"}
            and all(len(s.acked) == 4 for s in found.values())
            and all(routes_shop(port) for port in two_replicas)
        )

    wait_until(both_hold_the_whole_state, 20, "both ingresses holding the application, all four types acknowledged")
    # Identical versions for the same state (proxy records lag ACKs by a batching window: wait for both).
    wait_until(
        lambda: len({tuple(sorted(s.acked.items())) for s in asyncio.run(statuses()).values()}) == 1,
        10,
        "identical acknowledged versions on both replicas",
    )
