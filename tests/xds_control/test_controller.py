"""The Controller keeps every other node's pushes going when building one node's snapshot fails unexpectedly.

No topology is known to make translation raise anything but ValueError (which was always caught); the failure is
injected through the Controller's ``translate`` parameter, wrapping the real translator for every other node.
"""

from __future__ import annotations

import logging

import pytest
from envoy.config.core.v3 import base_pb2

from protos.topology.applications import Application, Stage, Variant
from xds_control.build_cache import BuildCache
from xds_control.controller import Controller
from xds_control.snapshot import Snapshot, SnapshotCache
from xds_control.topology import Topology
from xds_control.tracing_config import EnvoyTracing
from xds_control.translate import NodeInfo, snapshot_for

ROUTES = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"


def _ingress(node_id: str, port: int) -> base_pb2.Node:
    node = base_pb2.Node(id=node_id)
    node.metadata.update({"role": "ingress", "listen_port": port})
    return node


def _topology(revision: int, apps: list[str]) -> Topology:
    stage = Stage(variants=[Variant(model="m", version=1, weight=100)])
    return Topology(revision=revision, applications={a: Application(name=a, stages=[stage]) for a in apps})


def test_an_unexpected_translation_error_stalls_only_its_node(caplog: pytest.LogCaptureFixture) -> None:
    failing: set[str] = set()

    def translate(
        topology: Topology, node: NodeInfo, cache: BuildCache, max_request_bytes: int, tracing: EnvoyTracing | None
    ) -> Snapshot:
        if node.node_id in failing:
            raise RuntimeError("injected translation bug")
        return snapshot_for(topology, node, cache, max_request_bytes, tracing)

    cache = SnapshotCache()
    controller = Controller(cache, translate=translate)
    controller.apply(_topology(1, ["a"]))
    # Connected in this order, the failing node is built first: an escaped error would skip the other.
    controller.node_connected(_ingress("broken", 18080))
    controller.node_connected(_ingress("healthy", 18081))
    broken_before, healthy_before = cache.get("broken"), cache.get("healthy")
    assert broken_before is not None and healthy_before is not None

    failing.add("broken")
    controller.apply(_topology(2, ["a", "b"]))

    healthy_after = cache.get("healthy")
    assert healthy_after is not None
    assert healthy_after.versions[ROUTES] != healthy_before.versions[ROUTES]
    assert cache.get("broken") is broken_before, "the failing node keeps its last good snapshot"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert any("broken" in r.getMessage() and "revision 2" in r.getMessage() for r in errors)

    # Once translation works again, the node catches up with the latest topology.
    failing.clear()
    controller.apply(_topology(3, ["a", "b"]))
    recovered = cache.get("broken")
    assert recovered is not None
    assert recovered.versions[ROUTES] == healthy_after.versions[ROUTES]
