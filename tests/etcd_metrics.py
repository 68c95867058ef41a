"""What a real etcd reports about itself, read from its /metrics endpoint (tests check that watches end)."""

from __future__ import annotations

import httpx

from manager_api.etcd_server import EtcdServer


def etcd_watchers(etcd: EtcdServer) -> int:
    """How many watchers the etcd holds open right now (``etcd_debugging_mvcc_watcher_total``)."""
    metrics = httpx.get(f"http://{etcd.endpoint}/metrics", timeout=10).text
    for line in metrics.splitlines():
        if line.startswith("etcd_debugging_mvcc_watcher_total "):
            return int(float(line.split()[1]))
    raise AssertionError("etcd exposes no etcd_debugging_mvcc_watcher_total")
