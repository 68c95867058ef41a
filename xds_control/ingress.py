"""``python -m xds_control.ingress``: render the ingress bootstrap and become its Envoy.

For containers (compose/): the process execs Envoy, so Envoy is PID 1's replacement and gets the container's
signals itself. ``hydro up`` and the tests start the ingress through ``xds_control.bootstrap.ingress_envoy``.
Envoy's static ``xds`` cluster takes an IP address, not a host name: ``--xds-host`` must be one.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import tempfile
from pathlib import Path

from xds_control.bootstrap import ADS_API_TYPES, find_envoy_binary, render_bootstrap

#: Envoy's admin port in the container (bound to loopback by the template).
DEFAULT_ADMIN_PORT = 9901


def _ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an IP address (the bootstrap's static xds cluster cannot resolve names)"
        ) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m xds_control.ingress", description=__doc__)
    parser.add_argument("--xds-host", type=_ip, required=True, help="IP address of xds_control")
    parser.add_argument("--xds-port", type=int, default=18000)
    parser.add_argument("--listen-address", default="0.0.0.0", help="address the ingress listener binds")
    parser.add_argument("--listen-port", type=int, default=8080, help="ingress port (REST and gRPC)")
    parser.add_argument("--admin-port", type=int, default=DEFAULT_ADMIN_PORT)
    parser.add_argument("--node-id", default="ingress")
    parser.add_argument("--ads-api-type", choices=ADS_API_TYPES, default="GRPC")
    parser.add_argument("--config", type=Path, default=None, help="where to write the bootstrap (default: a temp file)")
    parser.add_argument("--log-level", default="warn")
    return parser.parse_args(argv)


def bootstrap_of(args: argparse.Namespace) -> str:
    """The ingress bootstrap YAML for these parsed arguments."""
    return render_bootstrap(
        "ingress",
        node_id=args.node_id,
        listen_address=args.listen_address,
        listen_port=args.listen_port,
        admin_port=args.admin_port,
        xds_host=args.xds_host,
        xds_port=args.xds_port,
        ads_api_type=args.ads_api_type,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    bootstrap = bootstrap_of(args)
    config = args.config or Path(tempfile.mkdtemp(prefix="hydro-ingress-")) / "ingress.yaml"
    config.write_text(bootstrap)
    envoy = find_envoy_binary()
    # A dynamic base id costs nothing alone in a container and lets it run beside other Envoys on one host.
    os.execv(envoy, [envoy, "-c", str(config), "--use-dynamic-base-id", "--log-level", args.log_level])


if __name__ == "__main__":
    main()
