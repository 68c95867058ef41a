"""`hydro agent`: the process deployer on a host of its own, for the replicas placed on that host.

It announces ``nodes/{name}`` under a lease, then runs the same ProcessDeployer as `hydro up` does: it reads
deployments and live nodes from etcd, takes its share (placement.py), fetches model archives from the manager
API, and registers its ready instances at its advertise address under the same lease. SIGINT or SIGTERM drains
and stops its replicas and revokes the lease; SIGKILL lets the lease expire, after which the other nodes take
its replicas over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import aetcd

from manager_api.deployer.fetch import FetchedArtifacts
from manager_api.deployer.process import ProcessDeployer
from manager_api.deployer.registration import LeasedInstanceRegistry
from manager_api.store.topology_store import TopologyStore
from protos.topology.keys import DEFAULT_PREFIX, Keys
from protos.topology.nodes import Node
from xds_control.etcd_watch import ETCD_CLIENT_OPTIONS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentConfig:
    """Where the agent finds etcd, xds_control and the manager, and how other hosts reach it."""

    node: str
    advertise_address: str
    manager_url: str
    data_dir: Path
    etcd_host: str = "127.0.0.1"
    etcd_port: int = 2379
    #: Deadline of one etcd call (seconds), as the manager's ``--etcd-timeout``: a frozen or cut-off etcd fails the
    #: call (logged, retried) instead of holding the agent's loops, its registry lock and its shutdown for ever.
    etcd_timeout: float = 5.0
    prefix: str = DEFAULT_PREFIX
    xds_host: str = "127.0.0.1"
    xds_port: int = 18000
    #: ADS flavour of the sidecars' bootstraps: GRPC (state of the world) or DELTA_GRPC.
    ads_api_type: str = "GRPC"
    #: A viewer token is enough: the agent only downloads artifacts from the manager.
    token: str | None = None
    #: Seconds after a SIGKILL before this node's endpoints leave EDS and its replicas move.
    lease_ttl: int = 5
    drain_seconds: float = 1.0


def host_port(value: str) -> tuple[str, int]:
    """``HOST:PORT`` as a pair; ValueError saying what is expected otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


async def run_agent(config: AgentConfig, stop: asyncio.Event) -> None:
    """Run until ``stop`` is set, then drain and stop every replica and revoke the node's lease."""
    # Validated before anything starts: the name becomes an etcd key segment and part of every instance id.
    node = Node(name=config.node, advertise_address=config.advertise_address)
    client = aetcd.Client(
        host=config.etcd_host,
        port=config.etcd_port,
        options=ETCD_CLIENT_OPTIONS,
        timeout=config.etcd_timeout,  # type: ignore[arg-type]  # aetcd says int; gRPC takes float seconds
    )
    await client.connect()
    keys = Keys(config.prefix)
    registry = LeasedInstanceRegistry(client, keys, node.name, ttl=config.lease_ttl, announce=node)
    deployer: ProcessDeployer | None = None
    try:
        await registry.start()
        deployer = ProcessDeployer(
            TopologyStore(client, keys),
            FetchedArtifacts(config.data_dir / "artifacts", config.manager_url, config.token),
            registry,
            node=node.name,
            advertise_address=config.advertise_address,
            xds_host=config.xds_host,
            xds_port=config.xds_port,
            workdir=config.data_dir / "replicas",
            drain_seconds=config.drain_seconds,
            ads_api_type=config.ads_api_type,
        )
        await deployer.start()
        log.info("agent %s up, advertising %s", node.name, node.advertise_address)
        await stop.wait()
    finally:
        if deployer is not None:
            await deployer.stop()
        await registry.stop()
        await client.close()


def serve(config: AgentConfig) -> int:
    """Run the agent in this process until SIGINT or SIGTERM."""
    # Readiness polls of every starting replica would otherwise log each attempt.
    logging.getLogger("httpx").setLevel(logging.WARNING)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await run_agent(config, stop)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0
