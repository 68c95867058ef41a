"""Configuration of one manager_api process, from its command line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from protos.topology.keys import DEFAULT_PREFIX

DeployerKind = Literal["none", "process"]


@dataclass(frozen=True)
class Settings:
    """Where etcd and the artifact store are, and which deployer runs replicas."""

    etcd_host: str = "127.0.0.1"
    etcd_port: int = 2379
    #: Deadline of one etcd read (seconds): past it the call is a 503, not a request that waits for ever.
    etcd_timeout: float = 5.0
    prefix: str = DEFAULT_PREFIX
    data_dir: Path = Path(".hydro")
    deployer: DeployerKind = "none"
    xds_host: str = "127.0.0.1"
    xds_port: int = 18000
    #: ADS flavour of the sidecars' bootstraps: GRPC (state of the world) or DELTA_GRPC.
    ads_api_type: str = "GRPC"
    #: This deployer's node name in ``nodes/`` (`hydro up`'s is "local"; each `hydro agent` names its own).
    node: str = "local"
    #: Where the sidecars of this node's replicas listen and are registered (other hosts call them there).
    advertise_address: str = "127.0.0.1"
    max_upload_bytes: int = 2 * 1024**3
    #: Most ``/events`` streams open at once (each holds an etcd watch for as long as its client reads).
    max_event_streams: int = 256
    #: Where archives are kept: None for ``{data_dir}/artifacts``, else ``s3://BUCKET/PREFIX`` or a directory.
    artifact_store: str | None = None
    #: Endpoint of an S3-compatible server (MinIO, ...); None for AWS S3 or AWS_ENDPOINT_URL.
    s3_endpoint: str | None = None
    drain_seconds: float = 1.0
    #: Folders under which POST /models/{model}/versions/from-path may read model folders; empty: refused.
    register_roots: tuple[Path, ...] = ()
    #: Bearer tokens (see manager_api/auth.py); None disables auth, allowed only on a loopback address.
    tokens_file: Path | None = None
