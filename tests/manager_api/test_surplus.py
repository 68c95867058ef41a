"""Which replicas a node stops when it should run fewer: not-ready ones first, ready ones only make-before-break."""

from __future__ import annotations

from dataclasses import dataclass

from manager_api.deployer.process import surplus


@dataclass
class R:
    name: str
    state: str = "ready"


def names(replicas: list[R]) -> list[str]:
    return [r.name for r in replicas]


def test_nothing_to_stop_when_the_node_runs_its_share_or_less() -> None:
    assert surplus([R("a"), R("b")], want=2, ready=2, total=2) == []
    assert surplus([R("a")], want=2, ready=1, total=2) == []


def test_a_scale_down_stops_the_newest_ready_replica() -> None:
    assert names(surplus([R("a"), R("b")], want=1, ready=2, total=1)) == ["b"]


def test_not_ready_replicas_go_before_ready_ones() -> None:
    running = [R("a"), R("b", "starting"), R("c"), R("d", "crashed")]
    assert names(surplus(running, want=2, ready=2, total=2)) == ["b", "d"]


def test_a_handover_waits_until_the_new_owner_has_ready_replicas() -> None:
    # Another node joined and owns one of our two replicas now; its own is still starting.
    running = [R("a"), R("b")]
    assert surplus(running, want=1, ready=2, total=2) == []
    # Its replica is ready: three ready in the mesh, one to spare.
    assert names(surplus(running, want=1, ready=3, total=2)) == ["b"]


def test_a_deleted_deployment_stops_everything_at_once() -> None:
    assert names(surplus([R("a"), R("b", "starting")], want=0, ready=1, total=None)) == ["b", "a"]
