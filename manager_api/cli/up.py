"""`hydro up`: the whole stack on this machine."""

from __future__ import annotations

import enum
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from manager_api.cli.root import app

console = Console()


class XdsApi(enum.StrEnum):
    sotw = "sotw"
    delta = "delta"


@app.command()
def up(
    demo: Annotated[
        bool, typer.Option(help="Also push the iris examples as applications 'iris' and 'iris-pipeline'.")
    ] = False,
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
    models_dir: Annotated[
        Path | None,
        typer.Option(help="Register every sub-folder with a serving.yaml as a model; each change is a new version."),
    ] = None,
    otlp_endpoint: Annotated[
        str | None,
        typer.Option(
            help="OpenTelemetry collector (OTLP gRPC, HOST:PORT, e.g. Jaeger's 127.0.0.1:4317) for every process's "
            "and Envoy's spans; default $OTEL_EXPORTER_OTLP_ENDPOINT, none: tracing off."
        ),
    ] = None,
    trace_sampling_percent: Annotated[
        float, typer.Option(min=0, max=100, help="Share of requests the ingress traces (with a collector).")
    ] = 100.0,
    artifact_store: Annotated[
        str | None,
        typer.Option(
            help="Keep model archives in s3://BUCKET/PREFIX (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or a "
            "directory instead of DATA_DIR/artifacts."
        ),
    ] = None,
    s3_endpoint: Annotated[
        str | None, typer.Option(help="URL of an S3-compatible server such as MinIO (default: AWS_ENDPOINT_URL).")
    ] = None,
    allow_register_from: Annotated[
        list[Path] | None,
        typer.Option(help="Let admins register model folders under this folder by server path (repeatable)."),
    ] = None,
) -> None:
    """Start etcd, xds_control, manager_api and the ingress Envoy on this machine; Ctrl-C stops them all."""
    # Imported here, not at the top: every `hydro` command loads this module, and these (boto3, FastAPI, numpy,
    # the etcd client...) took most of the second each `hydro get` spent before printing anything.
    from manager_api.artifacts import ArtifactStoreUnavailable, open_blob_store
    from manager_api.credentials import CREDENTIALS_FILE
    from manager_api.processes import ReadinessTimeout
    from manager_api.stack import Stack, StackConfig, run_until_signalled
    from tracing.settings import InvalidEndpoint, parse_endpoint

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # httpx logs every request at INFO: the demo's and the readiness polls' would bury what the stack says.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if otlp_endpoint is not None:
        try:
            parse_endpoint(otlp_endpoint)
        except InvalidEndpoint as exc:
            raise typer.BadParameter(str(exc), param_hint="--otlp-endpoint") from None
    if artifact_store is not None:
        # Checked before anything starts: a wrong bucket or key is one line, not a manager that keeps restarting.
        try:
            open_blob_store(artifact_store, data_dir / "artifacts", s3_endpoint)
        except ArtifactStoreUnavailable as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from None
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
            models_dir=models_dir,
            otlp_endpoint=otlp_endpoint,
            trace_sampling_percent=trace_sampling_percent,
            register_roots=tuple(root.resolve() for root in allow_register_from or ()),
            artifact_store=artifact_store,
            s3_endpoint=s3_endpoint,
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
        collector = stack.env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if collector:
            console.print(f"  traces to:             {collector} ({trace_sampling_percent:g}% of requests)")
        if models_dir is not None:
            console.print(f"  models folder:         {models_dir.resolve()} (each sub-folder is a model)")
        if demo:
            from manager_api.demo import push_demo, usage

            console.print("Pushing the iris demos...")
            answers = push_demo(
                stack.api_url,
                stack.ingress_url,
                stack.credentials.token,
                progress=lambda line: console.print(line, highlight=False, markup=False),
            )
            console.print(f"The demo application 'iris' answered through the ingress: label {answers['iris']}")
            console.print(f"The demo application 'iris-pipeline' answered: species {answers['iris-pipeline']}")
            console.print(usage(stack.ingress_url), highlight=False, markup=False, soft_wrap=True)
        console.print("Press Ctrl-C to stop everything.", highlight=False)

    def stopping() -> None:
        # Stopping every runtime, sidecar and Envoy takes seconds: say so, or Ctrl-C looks ignored.
        console.print("Stopping everything hydro up started...", highlight=False)

    try:
        code = run_until_signalled(stack, announce, stopping)
    except ReadinessTimeout as exc:
        # Everything started is stopped by now; what failed and its log tail say why, without a traceback.
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    console.print("Stopped.", highlight=False)
    raise typer.Exit(code)
