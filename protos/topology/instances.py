"""``instances/`` and ``pipelines/`` (leased): the ready runtimes of model versions and of applications."""

from __future__ import annotations

from typing import Literal

from protos.topology.records import Record


class Instance(Record):
    """``instances/{model}/{version}/{id}`` (leased): a ready runtime reachable through its sidecar."""

    model: str
    version: int
    id: str
    node: str
    address: str
    port: int
    state: Literal["ready", "draining"] = "ready"


class PipelineInstance(Record):
    """``pipelines/{app}/{id}`` (leased): a ready pipeline runtime of an application, reachable through its sidecar.

    ``spec_digest`` names the stages, variants and shadows it was started with (weights excluded: Envoy owns them).
    """

    app: str
    id: str
    node: str
    address: str
    port: int
    spec_digest: str
    state: Literal["ready", "draining"] = "ready"
