"""`hydro get`, `hydro describe` and `hydro delete`: the manager's resources, read and removed by name."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.markup import escape

from manager_api.cli.connection import ApiOption, DataDirOption, TokenOption, fail, manager
from manager_api.cli.output import OutputFormat, OutputOption, emit, out, short_digest, table, when
from manager_api.cli.root import app
from manager_api.client import ApiError, ManagerClient

#: Every spelling a user may type for a kind, as kubectl accepts singular, plural and short names.
KIND_ALIASES = {
    **dict.fromkeys(("model", "models", "mo"), "models"),
    **dict.fromkeys(("deployment", "deployments", "deploy", "dep"), "deployments"),
    **dict.fromkeys(("application", "applications", "app", "apps"), "applications"),
    **dict.fromkeys(("proxy", "proxies", "px"), "proxies"),
}
KindArgument = Annotated[str, typer.Argument(help="models, deployments, applications or proxies (singular works too)")]
VersionOption = Annotated[int | None, typer.Option("--version", help="A model version (models and deployments).")]


def kind_of(text: str) -> str:
    """The canonical (plural) kind of what the user typed, or exit naming the known kinds."""
    kind = KIND_ALIASES.get(text.lower())
    if kind is None:
        fail(f"unknown kind {text!r}; expected models, deployments, applications or proxies")
    return kind


def split_version(name: str, version: int | None) -> tuple[str, int | None]:
    """``iris:2`` or ``iris`` with ``--version 2``: the model and the version, if one was given."""
    model, sep, tail = name.partition(":")
    if not sep:
        return name, version
    if not tail.isdigit() or (version is not None and version != int(tail)):
        fail(f"{name!r}: expected MODEL:VERSION with a number, agreeing with --version if both are given")
    return model, int(tail)


# Rows of `hydro get`, one function per kind.


def model_rows(models: list[dict[str, Any]]) -> list[list[object]]:
    return [
        [
            m["name"],
            v["version"],
            v["runtime"],
            short_digest(v["artifact"]["digest"]),
            v["artifact"]["size"],
            when(v.get("created_at")),
        ]
        for m in models
        for v in sorted(m["versions"], key=lambda v: int(v["version"]))
    ]


def instance_states(deployment: dict[str, Any]) -> str:
    """``2 ready, 1 crash-looping``: how many of a deployment's replicas are in each state."""
    counts: dict[str, int] = {}
    for instance in deployment.get("instances", []):
        counts[instance["state"]] = counts.get(instance["state"], 0) + 1
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "-"


def deployment_rows(deployments: list[dict[str, Any]]) -> list[list[object]]:
    return [
        [
            d["model"],
            d["version"],
            f"{d['ready_replicas']}/{d['replicas']}",
            instance_states(d),
            d["policies"]["timeout_ms"],
            when(d.get("updated_at")),
        ]
        for d in deployments
    ]


def variants_text(application: dict[str, Any]) -> str:
    """``iris:1 90%, iris:2 10%``; stages joined by ``->``."""
    return " -> ".join(
        ", ".join(f"{v['model']}:{v['version']} {v['weight']}%" for v in stage["variants"])
        for stage in application["stages"]
    )


def application_rows(applications: list[dict[str, Any]]) -> list[list[object]]:
    return [[a["name"], variants_text(a), when(a.get("updated_at"))] for a in applications]


def proxy_state(proxy: dict[str, Any]) -> str:
    """``ok``, or ``NACK: <Envoy's error>`` when the proxy rejected a config (it keeps serving the last good one)."""
    return f"NACK: {proxy['last_nack']}" if proxy.get("last_nack") else "ok"


#: xDS resource types by the names Envoy users know them by.
XDS_NAMES = {"Cluster": "CDS", "ClusterLoadAssignment": "EDS", "Listener": "LDS", "RouteConfiguration": "RDS"}


def acked_text(proxy: dict[str, Any]) -> str:
    """The resource types a proxy acknowledged, as ``CDS EDS LDS RDS``."""
    return " ".join(sorted(XDS_NAMES.get(type_name, type_name) for type_name in proxy.get("acked", {}))) or "-"


def proxy_rows(proxies: list[dict[str, Any]]) -> list[list[object]]:
    return [[p["node_id"], p["role"], acked_text(p), proxy_state(p), when(p.get("connected_at"))] for p in proxies]


COLUMNS = {
    "models": ("MODEL", "VERSION", "RUNTIME", "DIGEST", "SIZE", "CREATED"),
    "deployments": ("MODEL", "VERSION", "READY", "INSTANCES", "TIMEOUT_MS", "UPDATED"),
    "applications": ("NAME", "VARIANTS", "UPDATED"),
    "proxies": ("NODE", "ROLE", "ACKED", "STATUS", "CONNECTED"),
}
ROWS = {"models": model_rows, "deployments": deployment_rows, "applications": application_rows, "proxies": proxy_rows}


def fetch(client: ManagerClient, kind: str, name: str | None) -> list[dict[str, Any]]:
    """The API's records of ``kind``: all of them, or those named ``name`` (a deployment name may be MODEL:VERSION).

    As with ``kubectl get KIND NAME``, a name that matches nothing is a 404 ApiError, not an empty list.
    """
    if kind == "models":
        return client.list_models() if name is None else [client.get_model(name)]
    if kind == "deployments":
        deployments = client.list_deployments()
        if name is None:
            return deployments
        model, version = split_version(name, None)
        found = [d for d in deployments if d["model"] == model and version in (None, d["version"])]
        if not found:
            raise ApiError(
                404,
                f"deployment {model}:{version} not found"
                if version is not None
                else f"no deployment of model {model!r}",
            )
        return found
    if kind == "applications":
        if name is None:
            return client.list_applications()
        return [client.get_application(name)]
    return client.list_proxies() if name is None else [client.get_proxy(name)]


def sort_records(kind: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A stable order for scripts: by name, then by version."""
    if kind == "models":
        return sorted(records, key=lambda r: r["name"])
    if kind == "deployments":
        return sorted(records, key=lambda r: (r["model"], int(r["version"])))
    return sorted(records, key=lambda r: r.get("name") or r.get("node_id") or "")


@app.command()
def get(
    kind: KindArgument,
    name: Annotated[str | None, typer.Argument(help="Only this one (a deployment may be MODEL:VERSION).")] = None,
    output: OutputOption = OutputFormat.table,
    api: ApiOption = None,
    token: TokenOption = None,
    data_dir: DataDirOption = Path(".hydro"),
) -> None:
    """List models (one row per version), deployments, applications or proxies; -o json|yaml gives a list."""
    canonical = kind_of(kind)
    with manager(api, token, data_dir) as client:
        records = sort_records(canonical, fetch(client, canonical, name))
    if output is not OutputFormat.table:
        emit(records, output)
        return
    if not records:
        out.print(f"No {canonical}.")
        return
    out.print(table(None, COLUMNS[canonical], ROWS[canonical](records)))


def describe_one(client: ManagerClient, kind: str, name: str, version: int | None) -> dict[str, Any]:
    """The full record of one object, as the API returns it; a deployment needs a version unless it has one."""
    if kind == "models":
        record = client.get_model(name)
        if version is not None:
            record = {**record, "versions": [v for v in record["versions"] if v["version"] == version]}
            if not record["versions"]:
                raise ApiError(404, f"model version {name}:{version} not found")
        return record
    if kind == "deployments":
        model, version = split_version(name, version)
        if version is None:
            candidates = [d for d in client.list_deployments() if d["model"] == model]
            if not candidates:
                raise ApiError(404, f"no deployment of model {model!r}")
            if len(candidates) > 1:
                found = ", ".join(f"{d['model']}:{d['version']}" for d in candidates)
                fail(f"{model!r} has several deployments ({found}): say which with MODEL:VERSION or --version")
            return candidates[0]
        return client.get_deployment(model, version)
    if kind == "applications":
        return client.get_application(name)
    return client.get_proxy(name)


def _fields(pairs: list[tuple[str, object]]) -> None:
    width = max(len(key) for key, _ in pairs) + 2
    for key, value in pairs:
        out.print(f"[bold]{escape(key + ':'):<{width}}[/]{escape(str(value))}")


def _block(title: str, data: object) -> None:
    out.print(f"[bold]{escape(title)}:[/]")
    out.print(escape(yaml.safe_dump(data, sort_keys=True, default_flow_style=False).rstrip()), soft_wrap=True)


def _instances(title: str, instances: list[dict[str, Any]]) -> None:
    """A table of replicas as their deployers report them, then the last error of each that has one."""
    rows = [
        [i["id"], i["node"], f"{i['address']}:{i['port']}", i["state"], i["restarts"], when(i.get("since"))]
        for i in instances
    ]
    columns = ("ID", "NODE", "ADDRESS", "STATE", "RESTARTS", "SINCE")
    out.print(table(title, columns, rows) if rows else f"{title}: none")
    for i in instances:
        if i.get("last_error"):
            restart = f", next start {when(i['next_restart_at'])}" if i.get("next_restart_at") else ""
            out.print(f"[bold]Last error of {escape(i['id'])}{escape(restart)}:[/]")
            out.print(escape(i["last_error"]), soft_wrap=True)


def render_description(kind: str, record: dict[str, Any]) -> None:
    """`kubectl describe`-like text: the main fields, then tables and blocks for the nested parts."""
    if kind == "models":
        versions = sorted(record["versions"], key=lambda v: int(v["version"]))
        _fields([("Name", record["name"]), ("Versions", ", ".join(str(v["version"]) for v in versions))])
        out.print(table("Versions", COLUMNS["models"], model_rows([record])))
        latest = versions[-1]
        _block(f"Signature (version {latest['version']})", latest["signature"])
        if latest.get("labels"):
            _block("Labels", latest["labels"])
    elif kind == "deployments":
        _fields(
            [
                ("Model", record["model"]),
                ("Version", record["version"]),
                ("Replicas", f"{record['ready_replicas']} ready / {record['replicas']} desired"),
                ("Created", when(record.get("created_at"))),
                ("Updated", when(record.get("updated_at"))),
            ]
        )
        _block("Policies", record["policies"])
        _instances("Instances", record["instances"])
    elif kind == "applications":
        status = record["status"]
        _fields(
            [
                ("Name", record["name"]),
                ("Ready", "yes" if status["ready"] else f"no: {status['reason']}"),
                ("Created", when(record.get("created_at"))),
                ("Updated", when(record.get("updated_at"))),
            ]
        )
        rows = [
            [index, v["model"], v["version"], f"{v['weight']}%"]
            # Counted from 1, as the application's status and the x-hydro-stages header count them.
            for index, stage in enumerate(record["stages"], start=1)
            for v in stage["variants"]
        ]
        rows += [
            [index, s["model"], s["version"], "shadow"]
            for index, stage in enumerate(record["stages"], start=1)
            for s in stage.get("shadows", [])
        ]
        rows.sort(key=lambda row: row[0])
        out.print(table("Stages", ("STAGE", "MODEL", "VERSION", "WEIGHT"), rows))
        if status.get("pipeline_replicas") is not None:
            ready, desired = status["pipeline_ready_replicas"], record.get("pipeline_replicas", 1)
            _fields([("Pipeline", f"{ready} ready / {desired} desired")])
            _instances("Pipeline replicas", status["pipeline_replicas"])
    else:
        _fields(
            [
                ("Node", record["node_id"]),
                ("Role", record["role"]),
                ("Connected", when(record.get("connected_at"))),
                ("Status", proxy_state(record)),
                ("Last NACK at", when(record.get("last_nack_at"))),
            ]
        )
        rows = [[type_name, version] for type_name, version in sorted(record.get("acked", {}).items())]
        out.print(table("Acknowledged", ("TYPE", "VERSION"), rows))


@app.command()
def describe(
    kind: KindArgument,
    name: Annotated[str, typer.Argument(help="The object's name (a deployment: MODEL or MODEL:VERSION).")],
    version: VersionOption = None,
    output: OutputOption = OutputFormat.table,
    api: ApiOption = None,
    token: TokenOption = None,
    data_dir: DataDirOption = Path(".hydro"),
) -> None:
    """Show one object in full; -o json|yaml gives the API's record."""
    canonical = kind_of(kind)
    with manager(api, token, data_dir) as client:
        record = describe_one(client, canonical, name, version)
    if output is not OutputFormat.table:
        emit(record, output)
    else:
        render_description(canonical, record)


def delete_model(client: ManagerClient, name: str, version: int | None) -> list[str]:
    """Delete one version, or every version newest first (stopping at the first the API refuses)."""
    if version is not None:
        client.delete_model_version(name, version)
        return [f"model/{name}:{version} deleted"]
    versions = sorted((int(v["version"]) for v in client.get_model(name)["versions"]), reverse=True)
    done: list[str] = []
    for number in versions:
        try:
            client.delete_model_version(name, number)
        except ApiError:
            for line in done:
                out.print(line)
            raise
        done.append(f"model/{name}:{number} deleted")
    return done


@app.command()
def delete(
    kind: KindArgument,
    name: Annotated[str, typer.Argument(help="The object's name (a deployment: MODEL or MODEL:VERSION).")],
    version: VersionOption = None,
    api: ApiOption = None,
    token: TokenOption = None,
    data_dir: DataDirOption = Path(".hydro"),
) -> None:
    """Delete a model version (all versions without --version), a deployment or an application."""
    canonical = kind_of(kind)
    if canonical == "proxies":
        fail("proxies cannot be deleted: xds_control writes them while an Envoy is connected")
    with manager(api, token, data_dir) as client:
        if canonical == "models":
            lines = delete_model(client, *split_version(name, version))
        elif canonical == "deployments":
            model, number = split_version(name, version)
            if number is None:
                number = int(describe_one(client, canonical, model, None)["version"])
            client.delete_deployment(model, number)
            lines = [f"deployment/{model}:{number} deleted"]
        else:
            client.delete_application(name)
            lines = [f"application/{name} deleted"]
    for line in lines:
        out.print(escape(line))
