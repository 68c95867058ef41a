"""Which replicas of a deployment a node runs, decided by every node alone from the same list of live nodes.

There is no scheduler: each deployer reads the live nodes (``nodes/`` in etcd, leased) and takes replica index
``i`` when ``nodes[(i + offset) % len(nodes)]`` is itself, nodes sorted by name and ``offset`` a stable hash of
the deployment, so that many one-replica deployments do not all land on the first node. Every node computes the
same answer from the same list, so together they run each replica once; when a node's lease expires the list
shrinks and its indices fall to the survivors on their next pass. Replicas of one deployment are
interchangeable, so a node only needs how many it runs, not which.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def deployment_offset(model: str, version: int) -> int:
    """A hash of the deployment that is the same in every process (Python's ``hash`` of a str is not)."""
    digest = hashlib.sha256(f"{model}/{version}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def replica_indices(replicas: int, nodes: Iterable[str], me: str, offset: int = 0) -> list[int]:
    """The replica indices (0-based) that node ``me`` runs; none when ``me`` is not among the live nodes."""
    ordered = sorted(set(nodes))
    if me not in ordered:
        return []
    return [i for i in range(replicas) if ordered[(i + offset) % len(ordered)] == me]


def share(model: str, version: int, replicas: int, nodes: Iterable[str], me: str) -> int:
    """How many of the ``replicas`` of deployment ``model:version`` node ``me`` runs."""
    return len(replica_indices(replicas, nodes, me, deployment_offset(model, version)))


def pipeline_share(app: str, replicas: int, nodes: Iterable[str], me: str) -> int:
    """How many of application ``app``'s ``replicas`` pipeline runtimes node ``me`` runs."""
    digest = hashlib.sha256(f"pipeline/{app}".encode()).digest()
    return len(replica_indices(replicas, nodes, me, int.from_bytes(digest[:4], "big")))
