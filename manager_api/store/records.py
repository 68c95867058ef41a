"""A record as etcd holds it: its JSON encoding and size limit, a value that does not parse, its revision."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from pydantic import BaseModel, ValidationError

RecordT = TypeVar("RecordT", bound=BaseModel)

#: Largest record written, in bytes of JSON: etcd refuses a request over its --max-request-bytes (1.5 MiB by
#: default) with an error that says nothing of which field made it so big.
MAX_RECORD_BYTES = 1024**2


class RecordTooLarge(ValueError):
    """A record is bigger than MAX_RECORD_BYTES; nothing written. The message names its size and the limit."""

    def __init__(self, what: str, size: int, detail: str = "") -> None:
        super().__init__(
            f"{what} would be {size} bytes in etcd, more than the {MAX_RECORD_BYTES} bytes a record may have"
            + (f": {detail}" if detail else "")
        )


def encoded_record(what: str, record: BaseModel) -> bytes:
    """The JSON stored for ``record``; RecordTooLarge if etcd would refuse it."""
    value = record.model_dump_json().encode()
    if len(value) > MAX_RECORD_BYTES:
        raise RecordTooLarge(what, len(value))
    return value


class CorruptRecord(ValueError):
    """A value in etcd does not parse as the record its key holds (written by hand, or by a newer schema)."""

    def __init__(self, key: str, kind: str, error: ValidationError) -> None:
        first = error.errors()[0] if error.errors() else {"msg": str(error), "loc": ()}
        where = ".".join(str(p) for p in first.get("loc", ())) or "value"
        super().__init__(
            f"the record at {key} in etcd is not a valid {kind} ({where}: {first.get('msg')}): "
            "replace it with a PUT, or delete it (etcdctl del)"
        )
        self.key = key


@dataclass(frozen=True)
class Stored(Generic[RecordT]):
    """A record with the etcd ``mod_revision`` it was read or written at (what clients send back to update it)."""

    record: RecordT
    revision: int
