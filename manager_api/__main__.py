"""``python -m manager_api``: the REST API (and the process deployer) on one port."""

from __future__ import annotations

import argparse
import ipaddress
import logging
from pathlib import Path

import uvicorn

from manager_api.app import create_app
from manager_api.artifacts import ArtifactStoreUnavailable, open_blob_store
from manager_api.settings import Settings
from protos.topology.keys import DEFAULT_PREFIX
from tracing.provider import setup_tracing
from tracing.settings import InvalidEndpoint

#: The --xds-api choices as Envoy's ads_config.api_type.
ADS_API_TYPE = {"sotw": "GRPC", "delta": "DELTA_GRPC"}


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host or "127.0.0.1", int(port)


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < 3600:
        raise argparse.ArgumentTypeError(f"expected seconds (more than 0, less than 3600), got {value!r}")
    return seconds


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value!r}")
    return int(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m manager_api", description=__doc__)
    parser.add_argument("--etcd", type=_host_port, default=("127.0.0.1", 2379), help="etcd endpoint HOST:PORT")
    parser.add_argument(
        "--etcd-timeout",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="deadline of one etcd read; past it the API answers 503 (default 5, etcd's own request timeout)",
    )
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="etcd key prefix of the desired state")
    parser.add_argument("--data-dir", type=Path, default=Path(".hydro"), help="artifact store and replica logs")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--deployer", choices=("none", "process"), default="none", help="who runs replicas")
    parser.add_argument("--node", default="local", help="node name of the process deployer in nodes/")
    parser.add_argument(
        "--advertise-address", default="127.0.0.1", help="address the process deployer's sidecars listen on"
    )
    parser.add_argument("--xds", type=_host_port, default=("127.0.0.1", 18000), help="xds_control HOST:PORT")
    parser.add_argument(
        "--xds-api", choices=("sotw", "delta"), default="sotw", help="ADS flavour the sidecars speak to xds_control"
    )
    parser.add_argument("--max-upload-mb", type=int, default=2048)
    parser.add_argument(
        "--max-event-streams",
        type=_positive_int,
        default=256,
        help="most GET /api/v1/events streams open at once; more are a 503 with Retry-After (default: 256)",
    )
    parser.add_argument(
        "--artifact-store",
        default=None,
        help="s3://BUCKET/PREFIX (credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or a directory; "
        "default: DATA_DIR/artifacts",
    )
    parser.add_argument(
        "--s3-endpoint", default=None, help="URL of an S3-compatible server such as MinIO (default: AWS_ENDPOINT_URL)"
    )
    parser.add_argument(
        "--tokens", type=Path, default=None, help="bearer tokens file (required unless --host is a loopback address)"
    )
    parser.add_argument(
        "--allow-register-from",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="let admins register model folders under DIR by server path (repeatable; default: nowhere)",
    )
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.tokens is None and not _is_loopback(args.host):
        raise SystemExit(f"refusing to serve on {args.host} without --tokens: anyone could change the mesh")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # The process deployer polls each starting replica's readiness every 0.1 s, and httpx logs every request at
    # INFO: two thirds of a first `hydro up --demo`'s manager log were those lines, burying the replicas' own.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = Settings(
        etcd_host=args.etcd[0],
        etcd_port=args.etcd[1],
        etcd_timeout=args.etcd_timeout,
        prefix=args.prefix,
        data_dir=args.data_dir.resolve(),
        deployer=args.deployer,
        node=args.node,
        advertise_address=args.advertise_address,
        xds_host=args.xds[0],
        xds_port=args.xds[1],
        ads_api_type=ADS_API_TYPE[args.xds_api],
        max_upload_bytes=args.max_upload_mb * 1024 * 1024,
        max_event_streams=args.max_event_streams,
        tokens_file=args.tokens,
        artifact_store=args.artifact_store,
        s3_endpoint=args.s3_endpoint,
        register_roots=tuple(root.resolve() for root in args.allow_register_from),
    )
    # A missing bucket or refused credentials is a one-line error here, not a traceback from the lifespan.
    try:
        open_blob_store(settings.artifact_store, settings.data_dir / "artifacts", settings.s3_endpoint)
    except ArtifactStoreUnavailable as exc:
        raise SystemExit(f"manager_api: {exc}") from None
    try:
        # The OTEL_* variables reach the replicas it starts too (children inherit the environment).
        tracing = setup_tracing("manager_api")
    except InvalidEndpoint as exc:
        raise SystemExit(f"tracing: {exc}") from None
    try:
        # Replicas are children of this process: uvicorn's graceful shutdown runs the lifespan, which stops them.
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level.lower())
    finally:
        tracing.shutdown()


if __name__ == "__main__":
    main()
