"""What a TopologyStore write or watch raises besides the errors of record encoding (those are in records.py)."""

from __future__ import annotations


class ConflictError(RuntimeError):
    """A write lost a race too many times; the caller may retry."""


class RevisionMismatch(RuntimeError):
    """A conditional write found the record at another revision than the client read (0: absent); nothing written."""

    def __init__(self, what: str, expected: int, current: int, deleting: bool = False) -> None:
        if expected == 0 and deleting:
            # A DELETE with revision 0 ("only if absent") can only find the record there.
            message = f"{what} exists (revision {current}), not at revision 0: read it again and retry"
        elif expected == 0:
            message = f"{what} exists (revision {current}) but revision 0 asks to create it: read it again and retry"
        elif current == 0:
            message = f"{what} changed since revision {expected} (now deleted): read it again and retry"
        else:
            message = f"{what} changed since revision {expected} (now {current}): read it again and retry"
        super().__init__(message)
        self.what = what
        self.expected = expected
        self.current = current


class VersionNotRegistered(LookupError):
    """A write names a model version that is not (or no longer) registered; nothing written."""

    def __init__(self, model: str, version: int) -> None:
        super().__init__(f"model version {model}:{version} is not registered")
        self.model = model
        self.version = version


class HistoryCompacted(RuntimeError):
    """A watch asked for changes older than etcd keeps (they were compacted away)."""

    def __init__(self, start: int) -> None:
        super().__init__(
            f"the changes after revision {start - 1} are compacted away in etcd: read the current state and "
            "follow the events from the revisions it carries"
        )
        self.start = start
