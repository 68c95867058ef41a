"""The `hydro` Typer application that every command module registers itself on."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Hydro Serving: a machine-learning serving mesh.",
    no_args_is_help=True,
    # Tracebacks with locals would print the bearer token; errors are reported as one line instead.
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root() -> None:
    """Hydro Serving command line."""
