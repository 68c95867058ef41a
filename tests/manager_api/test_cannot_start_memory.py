"""The deployer's memory of what could not start holds only what this node still wants to run.

A fake desired state whose model versions cannot be read: every deployment and pipeline fails before any process
is started, so the reconciler's books are all there is to look at (no etcd, no runtime, no Envoy needed).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from manager_api.deployer.process import ProcessDeployer
from protos.topology.applications import Application, ShadowVariant, Stage, Variant
from protos.topology.deployments import Deployment
from protos.topology.instances import Instance, PipelineInstance
from protos.topology.models import ModelVersion
from protos.topology.nodes import Node
from protos.topology.replicas import ReplicaStatus

#: Fixed timestamps: the same spec written again is the same record, as a manifest applied twice is.
STAMP = "2026-01-01T00:00:00.000+00:00"


class Unreadable(Exception):
    """A model version the deployer cannot read (an archive lost, a download refused)."""


class FakeDesired:
    """Deployments, applications and live nodes as a test sets them; every model version read fails."""

    def __init__(self, node: str) -> None:
        self.deployments: list[Deployment] = []
        self.applications: list[Application] = []
        self.nodes = [Node(name=node, advertise_address="127.0.0.1")]
        #: Model versions the deployer asked for, in order: each one is an attempt to start something.
        self.reads: list[tuple[str, int]] = []

    async def list_deployments(self) -> list[Deployment]:
        return list(self.deployments)

    async def list_nodes(self) -> list[Node]:
        return list(self.nodes)

    async def list_instances(self) -> list[Instance]:
        return []

    async def get_model_version(self, name: str, version: int) -> ModelVersion | None:
        self.reads.append((name, version))
        raise Unreadable(f"{name}:{version} cannot be read")

    async def list_applications(self) -> list[Application]:
        return list(self.applications)

    async def list_pipelines(self) -> list[PipelineInstance]:
        return []

    async def _never(self) -> AsyncIterator[None]:
        return
        yield

    def watch_applications(self) -> Any:
        return self._never()

    def watch_deployments(self) -> Any:
        return self._never()

    def watch_nodes(self) -> Any:
        return self._never()


class NoFolders:
    def materialize(self, digest: str) -> Any:
        raise AssertionError("no model version is readable, so no folder is asked for")


class NoRegistry:
    async def register_instance(self, instance: Any) -> None: ...

    async def deregister_instance(self, instance: Any) -> None: ...

    async def report_status(self, status: ReplicaStatus | Any) -> None: ...

    async def clear_status(self, status: ReplicaStatus | Any) -> None: ...


@pytest.fixture
def desired() -> FakeDesired:
    return FakeDesired("n1")


@pytest.fixture
def deployer(desired: FakeDesired, tmp_path: Path) -> ProcessDeployer:
    # reconcile() is called by the test, never start(): no background loop, nothing to stop.
    return ProcessDeployer(
        desired, NoFolders(), NoRegistry(), node="n1", xds_host="127.0.0.1", xds_port=1, workdir=tmp_path
    )


def deployment(model: str, replicas: int = 1) -> Deployment:
    return Deployment(model=model, version=1, replicas=replicas, created_at=STAMP, updated_at=STAMP)


def pipeline_app(name: str) -> Application:
    stage = Stage(variants=[Variant(model="a", version=1, weight=100)], shadows=[ShadowVariant(model="b", version=1)])
    return Application(name=name, stages=[stage], created_at=STAMP, updated_at=STAMP)


def attempts(desired: FakeDesired, model: str) -> int:
    return desired.reads.count((model, 1))


async def test_a_deleted_deployment_is_forgotten_and_its_recreation_tried_at_once(
    desired: FakeDesired, deployer: ProcessDeployer
) -> None:
    desired.deployments = [deployment("gone")]
    await deployer.reconcile()
    assert attempts(desired, "gone") == 1
    # Within its back-off (0.5 s after one failure) it is not tried again.
    await deployer.reconcile()
    assert attempts(desired, "gone") == 1
    desired.deployments = []
    await deployer.reconcile()
    assert deployer._cannot_start == {}
    # The same spec created again is a new deployment: tried on the next pass, not after the old back-off.
    desired.deployments = [deployment("gone")]
    await deployer.reconcile()
    assert attempts(desired, "gone") == 2


async def test_many_short_lived_failing_deployments_leave_nothing_behind(
    desired: FakeDesired, deployer: ProcessDeployer
) -> None:
    for n in range(50):
        desired.deployments = [deployment(f"short-{n}")]
        await deployer.reconcile()
    desired.deployments = []
    await deployer.reconcile()
    assert deployer._cannot_start == {}


async def test_a_deployment_scaled_to_zero_or_placed_elsewhere_is_forgotten(
    desired: FakeDesired, deployer: ProcessDeployer
) -> None:
    desired.deployments = [deployment("scaled"), deployment("kept")]
    await deployer.reconcile()
    assert set(deployer._cannot_start) == {"deployment scaled:1", "deployment kept:1"}
    desired.deployments = [deployment("scaled", replicas=0), deployment("kept")]
    await deployer.reconcile()
    # Still wanted here: its back-off is kept (an agent must not retry a refused download twice a second).
    assert set(deployer._cannot_start) == {"deployment kept:1"}


async def test_a_deleted_application_forgets_its_pipeline(desired: FakeDesired, deployer: ProcessDeployer) -> None:
    desired.applications = [pipeline_app("shadowed")]
    await deployer.reconcile()
    assert set(deployer._cannot_start) == {"the pipeline of shadowed"}
    desired.applications = []
    await deployer.reconcile()
    assert deployer._cannot_start == {}


async def test_a_node_that_does_not_see_itself_keeps_the_back_offs(
    desired: FakeDesired, deployer: ProcessDeployer
) -> None:
    desired.deployments = [deployment("held")]
    desired.applications = [pipeline_app("held-app")]
    await deployer.reconcile()
    before = dict(deployer._cannot_start)
    assert set(before) == {"deployment held:1", "the pipeline of held-app"}
    # Its lease is gone for a moment: it holds, and a deployment it cannot start is still wanted once it is back.
    desired.nodes = []
    await deployer.reconcile()
    assert deployer._cannot_start == before
