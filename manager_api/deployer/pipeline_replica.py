"""One pipeline runtime of an application on this machine: ``python -m runtimes.pipeline`` and its sidecar Envoy.

The lifecycle (starting, ready and registered, crash-looping, draining) is a model replica's (replica.py); what
differs is the processes, the spec file they read, and where they are registered: ``pipelines/{app}/{id}`` and
``pipeline-replicas/{app}/{id}``. A replica is started for one spec (``spec_digest``: the stages, variants and
shadows and the pipeline's time budget, not the weights, which the sidecar's routes carry) and never changes it: a
new spec means new replicas.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from manager_api.deployer.replica import PairConfig, ProcessPair
from manager_api.ports import free_port
from manager_api.processes import ChildProcess
from protos.contracts import version_key
from protos.topology.applications import Application
from protos.topology.instances import PipelineInstance
from protos.topology.models import Signature
from protos.topology.replicas import PipelineReplicaStatus
from protos.topology.replicas import ReplicaState as ReportedState
from runtimes.pipeline.spec import PipelineSpecFile
from xds_control.bootstrap import pipeline_envoy


def spec_digest(app: Application, timeout_ms: int) -> str:
    """What a running pipeline depends on: each stage's variants and shadows in order, weights left out, and its
    time budget (``--timeout``, xds_control.translate.pipeline_timeout_ms), which the stages' deployments set: the
    ingress takes a new one at once, so a running pipeline must not keep cutting calls at the old one."""
    shape = [
        {
            "variants": [version_key(v.model, v.version) for v in stage.variants],
            "shadows": [version_key(s.model, s.version) for s in stage.shadows],
        }
        for stage in app.stages
    ]
    return "sha256:" + hashlib.sha256(json.dumps([app.name, shape, timeout_ms]).encode()).hexdigest()


def members(app: Application) -> list[tuple[str, int]]:
    """Every model version the application names (variants and shadows), without repeats."""
    named = [(v.model, v.version) for stage in app.stages for v in stage.variants]
    named += [(s.model, s.version) for stage in app.stages for s in stage.shadows]
    return list(dict.fromkeys(named))


def write_spec(folder: Path, app: Application, signatures: Mapping[str, Signature]) -> Path:
    """Write the ``--spec`` JSON of the pipeline runtime (runtimes/pipeline/spec.py) into ``folder``."""
    document = PipelineSpecFile(application=app, signatures=dict(signatures))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.json"
    path.write_text(document.model_dump_json(indent=2))
    return path


@dataclass(frozen=True, kw_only=True)
class PipelineReplicaConfig(PairConfig):
    """Everything a pipeline replica needs to start."""

    app: str
    spec_path: Path
    spec_digest: str
    #: The whole pipeline's deadline, split by the runtime across its stages.
    timeout_s: float = 30.0


class PipelineReplica(ProcessPair[PipelineReplicaConfig]):
    """A pipeline runtime + sidecar pair serving one application."""

    outbound_port = 0
    # The runtime dials the sidecar's outbound listener. Envoy is ready only once its listeners are bound, so the
    # runtime never dials that loopback port before it listens (a client dialling a port nobody listens on can,
    # rarely, connect to itself and hold the port, and the sidecar then cannot bind its outbound listener).
    sidecar_first = True

    @property
    def instance(self) -> PipelineInstance:
        return PipelineInstance(
            app=self.config.app,
            id=self.id,
            node=self.config.node,
            address=self.config.advertise_address,
            port=self.inbound_port,
            spec_digest=self.config.spec_digest,
            state="ready" if self.state == "ready" else "draining",
        )

    @property
    def served(self) -> str:
        return f"the pipeline of {self.config.app}"

    def _status_record(self, state: ReportedState, since: str, next_restart_at: str | None) -> PipelineReplicaStatus:
        return PipelineReplicaStatus(
            app=self.config.app,
            id=self.id,
            node=self.config.node,
            state=state,
            address=self.config.advertise_address,
            port=self.inbound_port,
            spec_digest=self.config.spec_digest,
            restarts=self.restarts,
            since=since,
            last_error=self.last_error,
            next_restart_at=next_restart_at,
        )

    def _spawn(self, workdir: Path, admin_port: int) -> tuple[ChildProcess, ChildProcess]:
        cfg = self.config
        # The outbound listener is the runtime's only way to its stages: loopback, never advertised.
        self.outbound_port = free_port("127.0.0.1")
        runtime = ChildProcess(
            f"pipeline-{self.id}",
            [
                sys.executable,
                "-m",
                "runtimes.pipeline",
                "--spec",
                str(cfg.spec_path),
                "--outbound",
                f"127.0.0.1:{self.outbound_port}",
                "--host",
                cfg.host,
                "--grpc-port",
                str(self.grpc_port),
                "--http-port",
                str(self.http_port),
                "--timeout",
                str(cfg.timeout_s),
                "--max-message-mb",
                str(cfg.max_message_mb),
            ],
            log_path=workdir / "pipeline.log",
        )
        sidecar = pipeline_envoy(
            workdir,
            app=cfg.app,
            instance=self.id,
            xds_port=cfg.xds_port,
            admin_port=admin_port,
            inbound_port=self.inbound_port,
            outbound_port=self.outbound_port,
            runtime_grpc_port=self.grpc_port,
            runtime_http_port=self.http_port,
            host=cfg.host,
            xds_host=cfg.xds_host,
            ads_api_type=cfg.ads_api_type,
            inbound_address=cfg.advertise_address,
        )
        return runtime, sidecar
