"""`hydro status`: is the stack reachable, and what runs in it (models, deployments, applications, proxies)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape

from manager_api.cli.connection import ApiOption, DataDirOption, TokenOption, manager, resolve
from manager_api.cli.output import OutputFormat, OutputOption, emit, out, table
from manager_api.cli.resources import acked_text, proxy_state, variants_text
from manager_api.cli.root import app
from manager_api.client import ManagerClient


def collect(client: ManagerClient, api_url: str) -> dict[str, Any]:
    """The summary as plain data (what -o json|yaml prints)."""
    health = client.health()
    models = sorted(client.list_models(), key=lambda m: m["name"])
    deployments = sorted(client.list_deployments(), key=lambda d: (d["model"], d["version"]))
    applications = sorted(client.list_applications(), key=lambda a: a["name"])
    proxies = sorted(client.list_proxies(), key=lambda p: p["node_id"])
    return {
        "api": {"url": api_url, "status": health.get("status"), "etcd": health.get("etcd")},
        "models": [{"name": m["name"], "versions": sorted(int(v["version"]) for v in m["versions"])} for m in models],
        "deployments": [
            {"model": d["model"], "version": d["version"], "replicas": d["replicas"], "ready": d["ready_replicas"]}
            for d in deployments
        ],
        "applications": [
            {"name": a["name"], "stages": a["stages"], "ready": a["status"]["ready"], "reason": a["status"]["reason"]}
            for a in applications
        ],
        "proxies": [
            {"node_id": p["node_id"], "role": p["role"], "acked": p.get("acked", {}), "last_nack": p.get("last_nack")}
            for p in proxies
        ],
    }


def render(summary: dict[str, Any]) -> None:
    api = summary["api"]
    out.print(escape(f"Manager API {api['url']}: {api['status']} (etcd {api['etcd']})"))
    sections: list[tuple[str, tuple[str, ...], list[list[object]]]] = [
        (
            "Models",
            ("MODEL", "VERSIONS", "LATEST"),
            [[m["name"], len(m["versions"]), m["versions"][-1] if m["versions"] else None] for m in summary["models"]],
        ),
        (
            "Deployments",
            ("MODEL", "VERSION", "READY"),
            [[d["model"], d["version"], f"{d['ready']}/{d['replicas']}"] for d in summary["deployments"]],
        ),
        (
            "Applications",
            ("NAME", "VARIANTS", "READY"),
            [[a["name"], variants_text(a), "yes" if a["ready"] else a["reason"]] for a in summary["applications"]],
        ),
        (
            "Proxies",
            ("NODE", "ROLE", "ACKED", "STATUS"),
            [[p["node_id"], p["role"], acked_text(p), proxy_state(p)] for p in summary["proxies"]],
        ),
    ]
    for title, columns, rows in sections:
        out.print()
        if rows:
            out.print(table(title, columns, rows))
        else:
            out.print(f"[bold]{title}[/]: none")


@app.command()
def status(
    output: OutputOption = OutputFormat.table,
    api: ApiOption = None,
    token: TokenOption = None,
    data_dir: DataDirOption = Path(".hydro"),
) -> None:
    """A summary of the stack: reachable, models, deployments (ready/desired), applications (ready, or why not),
    proxies (NACKs)."""
    api_url = resolve(api, token, data_dir).api_url
    with manager(api, token, data_dir) as client:
        summary = collect(client, api_url)
    if output is not OutputFormat.table:
        emit(summary, output)
    else:
        render(summary)
