"""The etcd request operations a TopologyStore transaction is made of, and reading its answer."""

from __future__ import annotations

from typing import Any

from aetcd import rpc


def put_op(key: bytes, value: bytes) -> rpc.RequestOp:
    """Write ``value`` at ``key``."""
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value))


def read_op(key: bytes) -> rpc.RequestOp:
    """Read ``key`` (its mod_revision is what ``mod_revision`` looks at)."""
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key))


def delete_op(key: bytes) -> rpc.RequestOp:
    """Delete ``key``."""
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))


def mod_revision(response: Any, index: int) -> int:
    """The mod_revision of the key read by the ``index``-th operation of a transaction's branch (0 if absent)."""
    kvs = response.responses[index].response_range.kvs
    return int(kvs[0].mod_revision) if kvs else 0
