"""The `hydro` command line."""

from __future__ import annotations

import enum
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from manager_api.credentials import CREDENTIALS_FILE
from manager_api.deployer.agent import AgentConfig, host_port, serve
from manager_api.stack import Stack, StackConfig, run_until_signalled
from protos.topology import DEFAULT_PREFIX

app = typer.Typer(help="Hydro Serving: a machine-learning serving mesh.", no_args_is_help=True)
console = Console()


class XdsApi(enum.StrEnum):
    sotw = "sotw"
    delta = "delta"


@app.callback()
def _root() -> None:
    """Hydro Serving command line."""


@app.command()
def up(
    demo: Annotated[bool, typer.Option(help="Also push the iris example as application 'iris'.")] = False,
    data_dir: Annotated[Path, typer.Option(help="Where etcd data, artifacts and logs live.")] = Path(".hydro"),
    host: Annotated[str, typer.Option(help="Address the ingress listens on.")] = "127.0.0.1",
    ingress_port: Annotated[int, typer.Option(help="Ingress port (REST and gRPC); 0 = any free port.")] = 8080,
    api_port: Annotated[int, typer.Option(help="Manager API port; 0 = any free port.")] = 8081,
    xds_port: Annotated[int, typer.Option(help="xDS (ADS) port; 0 = any free port.")] = 18000,
    xds_metrics_port: Annotated[int, typer.Option(help="xds_control /metrics port; 0 = any free port.")] = 18001,
    etcd_port: Annotated[int, typer.Option(help="etcd client port; 0 = any free port.")] = 2379,
    xds_api: Annotated[
        XdsApi, typer.Option(help="ADS flavour of every Envoy: state of the world or delta (incremental).")
    ] = XdsApi.sotw,
    control_host: Annotated[
        str, typer.Option(help="Address etcd, xds_control and the manager API listen on (agents reach it).")
    ] = "127.0.0.1",
    local_node: Annotated[
        bool, typer.Option(help="Run replicas on this machine as node 'local'; --no-local-node leaves them to agents.")
    ] = True,
) -> None:
    """Start etcd, xds_control, manager_api and the ingress Envoy on this machine; Ctrl-C stops them all."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stack = Stack(
        StackConfig(
            data_dir=data_dir,
            host=host,
            ingress_port=ingress_port,
            api_port=api_port,
            xds_port=xds_port,
            xds_metrics_port=xds_metrics_port,
            etcd_port=etcd_port,
            xds_api=xds_api.value,
            control_host=control_host,
            local_node=local_node,
        )
    )

    def announce() -> None:
        console.print(f"[bold green]Hydro Serving is up[/]  (logs in {stack.logs})")
        console.print(f"  ingress (REST + gRPC): {stack.ingress_url}")
        console.print(f"  manager API:           {stack.api_url}/api/v1")
        console.print(f"  API docs:              {stack.api_url}/docs")
        console.print(f"  admin token:           in {stack.data_dir / CREDENTIALS_FILE}")
        console.print(f"  xDS:                   {stack.xds_address} ({stack.config.xds_api})")
        console.print(f"  xDS metrics:           http://127.0.0.1:{stack.xds_metrics_port}/metrics")
        console.print(f"  etcd:                  {stack.etcd.endpoint}")
        if demo:
            from manager_api.demo import push_demo, usage

            console.print("Pushing the iris demo...")
            labels = push_demo(stack.api_url, stack.ingress_url, stack.credentials.token)
            console.print(f"The demo application answered through the ingress: label {labels}")
            console.print(usage(stack.ingress_url), highlight=False, markup=False, soft_wrap=True)
        console.print("Press Ctrl-C to stop everything.", highlight=False)

    raise typer.Exit(run_until_signalled(stack, announce))


def _host_port(value: str) -> tuple[str, int]:
    try:
        return host_port(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


@app.command()
def agent(
    node: Annotated[str, typer.Option(help="This host's name in nodes/, unique among the nodes.")],
    advertise_address: Annotated[str, typer.Option(help="This host's address that the ingress and others reach.")],
    manager: Annotated[str, typer.Option(help="Manager API URL, where model archives are downloaded from.")],
    etcd: Annotated[str, typer.Option(help="etcd endpoint HOST:PORT.")] = "127.0.0.1:2379",
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
        prefix=prefix,
        xds_host=xds_host,
        xds_port=xds_port,
        ads_api_type="DELTA_GRPC" if xds_api == XdsApi.delta else "GRPC",
        token=token,
        lease_ttl=lease_ttl,
    )
    raise typer.Exit(serve(config))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
