"""`hydro model push`: pack a model folder and stream it to the manager, with a progress bar for each step."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from manager_api.cli.connection import ApiOption, DataDirOption, TokenOption, fail, manager
from manager_api.cli.output import OutputFormat, OutputOption, emit, out
from manager_api.cli.root import app
from manager_api.client import ManagerClient, PackedModel, model_files, pack_model_to_file
from protos.topology.names import is_valid_name
from runtimes.serving_config import SERVING_FILE

model_app = typer.Typer(help="Model versions: push a model folder.", no_args_is_help=True)
app.add_typer(model_app, name="model")

#: Progress bars go to stderr and only to a terminal: scripts reading stdout (or a log) get the result alone.
_progress_console = Console(stderr=True)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=_progress_console,
        transient=True,
        disable=not _progress_console.is_terminal,
    )


def pack_with_progress(folder: Path, workdir: Path) -> PackedModel:
    """Pack ``folder`` into ``workdir``, showing the bytes of files read."""
    total = sum(path.stat().st_size for path in model_files(folder))
    with _progress() as progress:
        task = progress.add_task(f"packing {folder.name}", total=total)
        return pack_model_to_file(folder, workdir / "model.tar.gz", lambda done: progress.update(task, completed=done))


def upload_with_progress(client: ManagerClient, name: str, packed: PackedModel) -> dict[str, Any]:
    """Stream ``packed`` as the next version of ``name``, showing the bytes sent; the registered version."""
    with _progress() as progress:
        task = progress.add_task(f"uploading {name}", total=packed.size)
        result = client.upload_model(name, packed, lambda sent: progress.update(task, completed=sent))
        # The manager checks the archive after the last byte; the bar stays full meanwhile.
        progress.update(task, description=f"checking {name}")
        return result


def check_model_folder(folder: Path) -> None:
    """Exit with a clear line unless ``folder`` is a model folder."""
    if not folder.is_dir():
        fail(f"{folder}: not a directory")
    if not (folder / SERVING_FILE).is_file():
        fail(f"{folder}: not a model folder (no {SERVING_FILE} in it)")


@model_app.command("push")
def push(
    folder: Annotated[Path, typer.Argument(help=f"The model folder ({SERVING_FILE} at its root).")],
    name: Annotated[str | None, typer.Option("--name", help="Model name.", show_default="the folder's name")] = None,
    output: OutputOption = OutputFormat.table,
    api: ApiOption = None,
    token: TokenOption = None,
    data_dir: DataDirOption = Path(".hydro"),
) -> None:
    """Register the folder as a new version of the model and print the version number."""
    check_model_folder(folder)
    model = name or folder.resolve().name
    if not is_valid_name(model):
        fail(f"model name {model!r}: use lower-case letters, digits, '-', '_' and '.' (1 to 63), or pass --name")
    with manager(api, token, data_dir) as client, tempfile.TemporaryDirectory(prefix="hydro-push-") as workdir:
        packed = pack_with_progress(folder, Path(workdir))
        record = upload_with_progress(client, model, packed)
    if output is not OutputFormat.table:
        emit(record, output)
        return
    digest = record["artifact"]["digest"]
    out.print(
        escape(f"model/{model} version {record['version']} pushed ({record['runtime']}, {packed.size} bytes, {digest})")
    )
