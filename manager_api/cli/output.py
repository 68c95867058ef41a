"""Rendering for humans (rich tables) or scripts (``-o json|yaml``, keys sorted so diffs and parsers are stable)."""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Sequence
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

#: Tables and results go to stdout; result lines are not wrapped (they hold digests and URLs to copy).
out = Console(highlight=False, soft_wrap=True)
if not out.is_terminal and "COLUMNS" not in os.environ:
    # Piped into grep, awk or a file: a table row stays on one line, as kubectl's do, instead of folding at 80.
    out.width = 1000


class OutputFormat(enum.StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


OutputOption = Annotated[
    OutputFormat, typer.Option("--output", "-o", help="table for people, json or yaml for scripts (sorted keys).")
]


def dump(data: Any, fmt: OutputFormat) -> str:
    """``data`` as JSON or YAML text with sorted keys."""
    if fmt is OutputFormat.yaml:
        return yaml.safe_dump(data, sort_keys=True, default_flow_style=False)
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def emit(data: Any, fmt: OutputFormat) -> None:
    """Write ``data`` for a script; plain text, no markup or wrapping, so it parses back."""
    typer.echo(dump(data, fmt), nl=False)


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> Table:
    """A borderless table in the style of ``kubectl get``; cells wrap instead of being cut."""
    grid = Table(title=title, title_justify="left", box=None, header_style="bold", pad_edge=False)
    for column in columns:
        grid.add_column(column, overflow="fold")
    for row in rows:
        grid.add_row(*("-" if cell is None else str(cell) for cell in row))
    return grid


def short_digest(digest: str | None) -> str:
    """``sha256:0123456789ab`` from a full digest, as docker shows image ids."""
    if not digest:
        return "-"
    algorithm, _, hexdigest = digest.partition(":")
    return f"{algorithm}:{hexdigest[:12]}"


def when(timestamp: str | None) -> str:
    """An ISO timestamp shortened to the second."""
    return timestamp[:19].replace("T", " ") if timestamp else "-"
