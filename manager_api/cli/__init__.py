"""The `hydro` command line: `hydro up`, and kubectl-like commands that talk to the manager API.

Each module registers its commands on ``root.app`` when imported; importing this package imports them all.
"""

from __future__ import annotations

# Importing a command module registers its commands on root.app.
from manager_api.cli import agent, apply, predict, push, resources, status, up  # noqa: F401
from manager_api.cli.root import app


def main() -> None:
    """Entry point of the `hydro` console script."""
    app()


__all__ = ["app", "main"]
