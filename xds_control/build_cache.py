"""Reuse of translated resources between snapshots whose inputs did not change.

A topology change usually touches one model version, yet every snapshot holds all of them; rebuilding and
re-serializing thousands of unchanged clusters, endpoints and routes was most of the time from an etcd write
to a push. Inputs are compared by identity: the etcd watch keeps a parsed record object until its key changes
(``TopologyRecords``), so "the same object" means "the same record". Entries hold their inputs, so an id is
never reused while the entry lives.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class BuildCache:
    """Values built from inputs, by key; an entry is kept while some snapshot build still asks for it."""

    def __init__(self) -> None:
        self._entries: dict[Hashable, tuple[tuple[Any, ...], Any]] = {}
        self._used: set[Hashable] = set()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, inputs: Sequence[Any], build: Callable[..., T], *args: Any) -> T:
        """The value for ``key`` if it was built from these very input objects, else ``build(*args)``."""
        self._used.add(key)
        entry = self._entries.get(key)
        if (
            entry is not None
            and len(entry[0]) == len(inputs)
            and all(a is b for a, b in zip(entry[0], inputs, strict=True))
        ):
            self.hits += 1
            value: T = entry[1]
            return value
        self.misses += 1
        value = build(*args)
        self._entries[key] = (tuple(inputs), value)
        return value

    def sweep(self) -> None:
        """Forget entries no build asked for since the last sweep (removed model versions, applications)."""
        for key in self._entries.keys() - self._used:
            del self._entries[key]
        self._used.clear()
