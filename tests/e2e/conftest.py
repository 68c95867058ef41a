"""The whole stack from nothing: `hydro up` on free ports, with real etcd, Envoys and runtimes.

``mesh`` is one `hydro up` per test module; on teardown it is stopped with SIGTERM and nothing it started may be
left running.
"""

from __future__ import annotations

import os
import runpy
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydro_mesh import EXAMPLE, Mesh, descendants

from manager_api.credentials import load_credentials
from manager_api.processes import ChildProcess, free_port, http_ok


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("iris")
    shutil.copy(EXAMPLE / "serving.yaml", folder / "serving.yaml")
    runpy.run_path(str(EXAMPLE / "train.py"))["train"](folder)
    return folder


@pytest.fixture(scope="module")
def mesh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """`hydro up`; parametrize indirectly with "sotw" or "delta" to choose the ADS flavour (default sotw)."""
    xds_api = getattr(request, "param", "sotw")
    data_dir = tmp_path_factory.mktemp("hydro")
    ports = {name: free_port() for name in ("ingress", "api", "xds", "metrics", "etcd")}
    process = ChildProcess(
        "hydro-up",
        [
            sys.executable,
            "-m",
            "manager_api.cli",
            "up",
            "--data-dir",
            str(data_dir),
            "--ingress-port",
            str(ports["ingress"]),
            "--api-port",
            str(ports["api"]),
            "--xds-port",
            str(ports["xds"]),
            "--etcd-port",
            str(ports["etcd"]),
            "--xds-metrics-port",
            str(ports["metrics"]),
            "--xds-api",
            xds_api,
        ],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        log_path=data_dir / "hydro-up.log",
    ).start()
    mesh: Mesh | None = None
    try:
        process.wait_ready(lambda: http_ok(f"http://127.0.0.1:{ports['ingress']}/v2/health/ready"), 90)
        credentials = load_credentials(data_dir)
        assert credentials is not None, "hydro up wrote no credentials"
        mesh = Mesh(process, ports["ingress"], ports["api"], ports["xds"], credentials.token, data_dir)
        yield mesh
    finally:
        if mesh is not None:
            mesh.api.close()
        family = descendants(process.pid or 0)
        process.stop(grace=60)
        print(process.log_tail(80))
        survivors = [pid for pid in family if Path(f"/proc/{pid}").exists() and pid != os.getpid()]
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
        assert not survivors, f"hydro up left processes behind: {survivors}"
