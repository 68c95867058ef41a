"""`hydro agent`: run this host's share of every deployment, for stacks spread over several hosts."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Annotated

import typer

from manager_api.cli.root import app
from manager_api.cli.up import XdsApi
from protos.topology.keys import DEFAULT_PREFIX


def _host_port(value: str) -> tuple[str, int]:
    from manager_api.deployer.agent import host_port  # see agent() for why not at the top

    try:
        return host_port(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _seconds(value: float) -> float:
    # The same bounds as the manager's --etcd-timeout: 0 would fail every call, and an hour is no deadline.
    if not 0 < value < 3600:
        raise typer.BadParameter(f"expected seconds (more than 0, less than 3600), got {value:g}")
    return value


def _ip_address(value: str) -> str:
    # Sidecars listen on it and Envoy's endpoints take IP addresses only: a host name would register instances
    # that xds_control has to leave out (xds_control/topology.py), so no replica of this host would get traffic.
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise typer.BadParameter(f"must be an IP address (sidecars listen on it), not {value!r}") from None
    return value


@app.command()
def agent(
    node: Annotated[str, typer.Option(help="This host's name in nodes/, unique among the nodes.")],
    advertise_address: Annotated[
        str,
        typer.Option(callback=_ip_address, help="This host's IP address, which the ingress and others reach."),
    ],
    manager: Annotated[str, typer.Option(help="Manager API URL, where model archives are downloaded from.")],
    etcd: Annotated[str, typer.Option(help="etcd endpoint HOST:PORT.")] = "127.0.0.1:2379",
    etcd_timeout: Annotated[
        float,
        typer.Option(callback=_seconds, help="Seconds before an etcd call gives up (and is retried)."),
    ] = 5.0,
    xds: Annotated[str, typer.Option(help="xds_control HOST:PORT, for the sidecars.")] = "127.0.0.1:18000",
    xds_api: Annotated[XdsApi, typer.Option(help="ADS flavour of the sidecars.")] = XdsApi.sotw,
    prefix: Annotated[str, typer.Option(help="etcd key prefix of the desired state.")] = DEFAULT_PREFIX,
    data_dir: Annotated[Path, typer.Option(help="Artifact cache and replica logs.")] = Path(".hydro-agent"),
    token: Annotated[
        str | None, typer.Option(envvar="HYDRO_TOKEN", help="Manager API token (viewer is enough).", show_default=False)
    ] = None,
    lease_ttl: Annotated[int, typer.Option(min=1, help="Seconds before a dead agent's replicas move.")] = 5,
) -> None:
    """Run this host's share of every deployment (runtime + sidecar pairs) until Ctrl-C or SIGTERM."""
    # Imported here: every `hydro` command loads this module, and the deployer brings the etcd client and more.
    from manager_api.deployer.agent import AgentConfig, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    etcd_host, etcd_port = _host_port(etcd)
    xds_host, xds_port = _host_port(xds)
    config = AgentConfig(
        node=node,
        advertise_address=advertise_address,
        manager_url=manager,
        data_dir=data_dir.resolve(),
        etcd_host=etcd_host,
        etcd_port=etcd_port,
        etcd_timeout=etcd_timeout,
        prefix=prefix,
        xds_host=xds_host,
        xds_port=xds_port,
        ads_api_type="DELTA_GRPC" if xds_api == XdsApi.delta else "GRPC",
        token=token,
        lease_ttl=lease_ttl,
    )
    raise typer.Exit(serve(config))
