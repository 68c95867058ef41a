"""`hydro predict APP --data JSON|@file.json`: one Open Inference Protocol REST call through the ingress."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.markup import escape

from manager_api.cli.connection import fail, lacks_path, transport_reason
from manager_api.cli.output import OutputFormat, OutputOption, emit, out, table
from manager_api.cli.root import app

DEFAULT_INGRESS_URL = "http://127.0.0.1:8080"
INGRESS_ENV = "HYDRO_INGRESS_URL"


def request_body(data: str) -> dict[str, Any]:
    """The OIP request from ``--data``: inline JSON or ``@file``; a bare list of tensors becomes ``inputs``."""
    if data.startswith("@"):
        path = Path(data[1:])
        try:
            data = path.read_text()
        except OSError as exc:
            fail(f"--data {path}: cannot read: {exc.strerror or exc}")
    try:
        body = json.loads(data)
    except ValueError as exc:
        fail(f"--data is not valid JSON: {exc}")
    if isinstance(body, list):
        body = {"inputs": body}
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        fail('--data must be an inference request {"inputs": [...]} or a list of input tensors')
    return body


def infer_path(model: str, version: int | None) -> str:
    return f"/v2/models/{model}" + (f"/versions/{version}" if version is not None else "") + "/infer"


@app.command()
def predict(
    application: Annotated[str, typer.Argument(help="The application (or model) to call.")],
    data: Annotated[
        str, typer.Option("--data", "-d", help='The request: JSON ({"inputs": [...]} or a list of tensors) or @file')
    ],
    version: Annotated[
        int | None, typer.Option("--model-version", help="Call this version of a model instead of an application.")
    ] = None,
    ingress: Annotated[
        str, typer.Option("--ingress", envvar=INGRESS_ENV, help="Ingress (or runtime) REST URL.")
    ] = DEFAULT_INGRESS_URL,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 60.0,
    output: OutputOption = OutputFormat.table,
) -> None:
    """Send one inference request and print the outputs."""
    body = request_body(data)
    url = ingress.rstrip("/") + infer_path(application, version)
    try:
        response = httpx.post(url, json=body, timeout=timeout)
    except httpx.TransportError as exc:
        fail(
            f"cannot reach the ingress at {ingress} ({transport_reason(exc)}). Start the stack with `hydro up`, "
            f"or pass --ingress URL / set {INGRESS_ENV}."
        )
    try:
        answer = response.json()
    except ValueError:
        answer = None
    message = answer.get("error") if isinstance(answer, dict) else None
    if response.is_error and isinstance(message, str) and message and "\n" not in message:
        where = f"HTTP {response.status_code} from {url}"
        # The manager, one port away, answers an unknown path with a JSON error too; every OIP server (ingress,
        # runtime, Triton, KServe) answers liveness, so a 404 from one that does not is from the wrong server.
        if response.status_code == 404 and lacks_path(ingress, "/v2/health/live"):
            fail(f"{message} ({where}, which has no /v2/health/live: is {ingress} the ingress?)")
        fail(f"{message} ({where})")
    if response.is_error or not isinstance(answer, dict):
        # Neither an inference answer nor an OIP error (a page of HTML, plain text...): some other server listens
        # there. A short one-line body is quoted: it may say which server that is.
        text = response.text.strip()
        quoted = f" ({text})" if text and "\n" not in text and len(text) <= 200 else ""
        fail(
            f"HTTP {response.status_code} from {url} is not an Open Inference Protocol answer{quoted}: "
            f"is {ingress} the ingress?"
        )
    if output is not OutputFormat.table:
        emit(answer, output)
        return
    served_by = response.headers.get("x-hydro-served-by")
    header = f"{answer.get('model_name', application)} version {answer.get('model_version') or '-'}"
    out.print(escape(header + (f" (served by {served_by})" if served_by else "")))
    rows = [
        [o.get("name"), o.get("datatype"), json.dumps(o.get("shape")), json.dumps(o.get("data"))]
        for o in answer.get("outputs", [])
    ]
    out.print(table(None, ("OUTPUT", "DATATYPE", "SHAPE", "DATA"), rows))
