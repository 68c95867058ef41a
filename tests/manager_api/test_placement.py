"""Placement without a scheduler: every node computes its share of a deployment from the same live-node list."""

from __future__ import annotations

import pytest

from manager_api.deployer.placement import deployment_offset, replica_indices, share

NODES = ["h2", "h1", "h3"]


@pytest.mark.parametrize("replicas", [0, 1, 2, 3, 5, 64])
@pytest.mark.parametrize("offset", [0, 1, 7])
def test_every_replica_runs_on_exactly_one_live_node(replicas: int, offset: int) -> None:
    taken = [i for node in NODES for i in replica_indices(replicas, NODES, node, offset)]
    assert sorted(taken) == list(range(replicas))


def test_shares_differ_by_at_most_one() -> None:
    counts = [share("iris", 1, 5, NODES, node) for node in NODES]
    assert sum(counts) == 5
    assert max(counts) - min(counts) == 1


def test_two_replicas_on_two_nodes_take_one_each() -> None:
    assert [share("iris", 1, 2, ["h1", "h2"], node) for node in ("h1", "h2")] == [1, 1]


def test_the_answer_does_not_depend_on_the_order_nodes_are_listed_in() -> None:
    # Sorted, the nodes are a, b, c; offset 2 puts replica 0 on c, 1 on a, 2 on b, 3 on c again.
    listings = (["b", "a", "c"], ["c", "b", "a", "a"], ["a", "b", "c"])
    for node, expected in (("a", [1]), ("b", [2]), ("c", [0, 3])):
        assert [replica_indices(4, nodes, node, 2) for nodes in listings] == [expected] * 3, node


def test_a_node_that_is_not_live_runs_nothing() -> None:
    assert replica_indices(3, ["h1", "h2"], "h3") == []
    assert share("iris", 1, 3, [], "h1") == 0


def test_when_a_node_leaves_its_replicas_move_to_the_survivors() -> None:
    before = {node: share("iris", 1, 2, ["h1", "h2"], node) for node in ("h1", "h2")}
    after = share("iris", 1, 2, ["h2"], "h2")
    assert before == {"h1": 1, "h2": 1}
    assert after == 2


def test_single_replica_deployments_spread_over_the_nodes() -> None:
    # With no offset every one-replica deployment would land on the first node.
    homes = {next(n for n in NODES if share(f"m{i}", 1, 1, NODES, n)) for i in range(30)}
    assert homes == set(NODES)


def test_the_offset_is_stable_across_processes() -> None:
    # A fixed value: Python's str hash is salted per process and would make nodes disagree.
    assert deployment_offset("iris", 1) == 4148078368
