"""Where the manager API is and which token to send, the options that say so, and how failures are reported.

Precedence, as kubectl and the cloud CLIs do it: ``--api`` / ``--token``, then HYDRO_API_URL / HYDRO_TOKEN, then
the credentials file `hydro up` wrote in ``--data-dir`` (default ``.hydro``), then ``http://127.0.0.1:8081``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, NoReturn

import httpx
import typer
from rich.console import Console
from rich.markup import escape

from manager_api.client import ApiError, ManagerClient
from manager_api.credentials import CREDENTIALS_FILE, load_credentials
from manager_api.manifests import ManifestError

DEFAULT_API_URL = "http://127.0.0.1:8081"
API_ENV = "HYDRO_API_URL"
TOKEN_ENV = "HYDRO_TOKEN"

#: Errors go to stderr, one red line each, so stdout stays parseable with -o json|yaml.
errors = Console(stderr=True, highlight=False, soft_wrap=True)

# The defaults are said through show_default: "[default: ...]" inside a help text is Rich markup, which the
# help screen would swallow without a trace.
ApiOption = Annotated[
    str | None,
    typer.Option("--api", envvar=API_ENV, help="Manager API URL.", show_default="from the credentials file"),
]
TokenOption = Annotated[
    str | None,
    typer.Option("--token", envvar=TOKEN_ENV, help="Bearer token.", show_default="from the credentials file"),
]
DataDirOption = Annotated[Path, typer.Option("--data-dir", help=f"Where `hydro up` wrote {CREDENTIALS_FILE}.")]


@dataclass(frozen=True)
class Connection:
    """A resolved API URL and token, with where each came from (said in error messages)."""

    api_url: str
    token: str | None
    api_from: str
    token_from: str


def resolve(api: str | None, token: str | None, data_dir: Path) -> Connection:
    """Apply the precedence above; typer has already folded the environment variables into ``api``/``token``."""
    credentials = load_credentials(data_dir)
    where = f"{data_dir / CREDENTIALS_FILE}"
    if credentials is None and not (api and token) and (data_dir / CREDENTIALS_FILE).exists():
        # Falling back to the defaults would hide the file and report a puzzling 401 or refused connection.
        fail(
            f"{where}: not the credentials `hydro up` writes (JSON with api_url and token); "
            f"start `hydro up` again to rewrite it, or pass --api URL and --token TOKEN"
        )
    if api:
        api_url, api_from = api, f"--api or {API_ENV}"
    elif credentials is not None:
        api_url, api_from = credentials.api_url, where
    else:
        api_url, api_from = DEFAULT_API_URL, f"the default: no --api, no {API_ENV}, no {where}"
    if token:
        return Connection(api_url.rstrip("/"), token, api_from, f"--token or {TOKEN_ENV}")
    if credentials is not None:
        return Connection(api_url.rstrip("/"), credentials.token, api_from, where)
    # Said in the 401: the usual cause is a command run outside the folder `hydro up` runs in.
    nowhere = f"nowhere: no --token, no {TOKEN_ENV}, no {where}; run where `hydro up` runs, or pass --data-dir"
    return Connection(api_url.rstrip("/"), None, api_from, nowhere)


def fail(message: str) -> NoReturn:
    """Print one red error line and exit with status 1."""
    errors.print(f"[red]error: {escape(message)}[/]")
    raise typer.Exit(1)


def not_the_manager(connection: Connection, what: str) -> str:
    """The line for an answer that no manager API gives (another server listens at the URL)."""
    return (
        f"{connection.api_url} (from {connection.api_from}) answered {what}: is {connection.api_url} the manager API?"
    )


def lacks_path(base_url: str, path: str) -> bool:
    """True when the server at ``base_url`` answers ``GET path`` with 404: it has no such endpoint.

    Tells a server that speaks JSON errors but is not the one meant (the ingress at ``--api``, the manager at
    ``--ingress``: their ports are neighbours) from the right server refusing one name. False when unsure.
    """
    try:
        return httpx.get(base_url.rstrip("/") + path, timeout=5.0).status_code == 404
    except httpx.HTTPError:
        return False


def describe_api_error(exc: ApiError, connection: Connection) -> str:
    """The API's own ``error`` text, plus where the token came from when the token is the problem."""
    if exc.foreign:
        return not_the_manager(connection, f"HTTP {exc.status} with a body that is not the API's JSON error")
    if exc.status == 401:
        return f"{exc.message} (HTTP 401; token from {connection.token_from})"
    if exc.status == 403:
        return f"{exc.message} (HTTP 403)"
    return exc.message


def transport_reason(exc: httpx.TransportError) -> str:
    """Why a connection failed, in a few words: ``connection refused``, or the error's own text."""
    text = str(exc).strip().rstrip(".")
    if isinstance(exc, httpx.ConnectError) and "refused" in text.lower():
        return "connection refused"
    # A ConnectError also covers a name that does not resolve: say that, not "refused".
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def describe_unreachable(exc: httpx.TransportError, connection: Connection) -> str:
    """Where the CLI tried, why it failed, and how to start or point at a manager."""
    reason = transport_reason(exc)
    return (
        f"cannot reach the manager API at {connection.api_url} (from {connection.api_from}): {reason}. "
        f"Start the stack with `hydro up`, or pass --api URL / set {API_ENV}."
    )


@contextlib.contextmanager
def reported(connection: Connection) -> Iterator[None]:
    """Turn API errors, unreachable managers and bad manifests into one red line and exit code 1."""
    try:
        yield
    except ApiError as exc:
        # A 404 in the API's JSON shape may come from a server that only looks like the manager (the ingress maps
        # its own replies to {"error": ...} too): every manager answers /healthz, so ask it before blaming a name.
        if exc.status == 404 and not exc.foreign and lacks_path(connection.api_url, "/healthz"):
            fail(not_the_manager(connection, f"HTTP 404 ({exc.message}) and has no /healthz"))
        fail(describe_api_error(exc, connection))
    except httpx.TransportError as exc:
        fail(describe_unreachable(exc, connection))
    except json.JSONDecodeError:
        fail(not_the_manager(connection, "a success that is not the API's JSON"))
    except ManifestError as exc:
        for problem in exc.problems[:-1]:
            errors.print(f"[red]error: {escape(problem)}[/]")
        fail(exc.problems[-1])


@contextlib.contextmanager
def manager(api: str | None, token: str | None, data_dir: Path) -> Iterator[ManagerClient]:
    """A ManagerClient for the resolved connection, with every failure reported as one red line."""
    connection = resolve(api, token, data_dir)
    with reported(connection), ManagerClient(connection.api_url, connection.token) as client:
        yield client
