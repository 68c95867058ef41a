"""``proxies/{node_id}`` (leased, written by xds_control): what each connected Envoy has acknowledged."""

from __future__ import annotations

from pydantic import Field

from protos.topology.records import Record, now_iso


class ProxyStatus(Record):
    """``proxies/{node_id}`` (leased): what a connected Envoy has acknowledged, and its last rejection."""

    node_id: str
    role: str
    acked: dict[str, str] = Field(default_factory=dict)
    last_nack: str | None = None
    last_nack_at: str | None = None
    connected_at: str = Field(default_factory=now_iso)
