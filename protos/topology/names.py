"""Names of models, applications, instances and nodes: each becomes a segment of an etcd key."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field

NAME_PATTERN = r"^[a-z0-9]([a-z0-9_.-]{0,61}[a-z0-9])?$"
_NAME_RE = re.compile(NAME_PATTERN)

ResourceName = Annotated[
    str,
    Field(
        pattern=NAME_PATTERN,
        description="lower-case letters, digits, '-', '_' and '.', 1 to 63 characters",
        examples=["iris"],
    ),
]


def is_valid_name(name: str) -> bool:
    """Whether ``name`` can be used as a model, application or instance name (it becomes a key segment)."""
    # fullmatch, not match: the pattern's `$` also matches before a final newline, so "iris\n" would pass.
    return bool(_NAME_RE.fullmatch(name))
