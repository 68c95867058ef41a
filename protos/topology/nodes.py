"""``nodes/{name}`` (leased, written by each deployer): the hosts that run replicas."""

from __future__ import annotations

from pydantic import Field

from protos.topology.names import NAME_PATTERN
from protos.topology.records import Record, now_iso


class Node(Record):
    """``nodes/{name}`` (leased): a live deployer (``hydro up``'s local one or a ``hydro agent``) that runs replicas.

    It shares its lease with the node's instances: when the node dies, it and its endpoints leave etcd together.
    """

    name: str = Field(pattern=NAME_PATTERN)
    #: The address other hosts reach this node's sidecars at (registered in its instances).
    advertise_address: str
    started_at: str = Field(default_factory=now_iso)
