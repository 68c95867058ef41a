"""What every stored record shares: the base class with its ``schema_version``, timestamps, the trace context."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


def now_iso() -> str:
    """The current time as an ISO-8601 UTC timestamp, as stored in records."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Record(BaseModel):
    """Base of every stored value: strict about unknown fields so typos in manifests are caught."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: int = SCHEMA_VERSION


#: Longest ``trace_context`` kept (a W3C traceparent is 55 characters; room for a future version of it).
TRACE_CONTEXT_MAX_CHARS = 256


def trace_context_field() -> Any:
    """The ``trace_context`` field of a record that a manager write stores (Deployment, Application)."""
    # Left out of the JSON when unset: a write made with tracing off stores exactly what it stored before the
    # field existed, so readers older than it (extra="forbid") keep reading such records.
    return Field(
        default=None,
        max_length=TRACE_CONTEXT_MAX_CHARS,
        exclude_if=lambda value: value is None,
        description="W3C traceparent of the manager write that stored this record (unset: that write was not "
        "traced); xds_control links its push to it (docs/tracing.md)",
    )
