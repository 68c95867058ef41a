"""Driving a whole `hydro up` stack from end-to-end tests: its URLs, the manager client, the iris rows."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
from sklearn.datasets import load_iris

from manager_api.client import ManagerClient
from manager_api.processes import ChildProcess

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "iris"
ROWS = load_iris().data[[0, 50, 100, 120]]
#: The classes of ROWS.
EXPECTED = [0, 1, 2, 2]


class Mesh:
    def __init__(
        self, process: ChildProcess, ingress_port: int, api_port: int, xds_port: int, token: str, data_dir: Path
    ) -> None:
        self.process = process
        self.data_dir = data_dir
        #: pgrep pattern of this stack's xds_control (other stacks may run beside it).
        self.xds_pattern = rf"[-]m xds_control .*--port {xds_port} "
        self.ingress = f"http://127.0.0.1:{ingress_port}"
        self.grpc_target = f"127.0.0.1:{ingress_port}"
        self.api = ManagerClient(f"http://127.0.0.1:{api_port}", token)

    def runtime_pids(self, model: str, version: int) -> list[int]:
        """Runtime processes of this stack (its artifacts folder is in their command line) for one version."""
        pattern = rf"[-]m runtimes --model-dir {self.data_dir}/\S* --name {model} --version {version} "
        found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        return [int(pid) for pid in found]

    def infer(self, app: str = "iris", timeout: float = 10.0) -> httpx.Response:
        body = {"inputs": [{"name": "input", "shape": list(ROWS.shape), "datatype": "FP64", "data": ROWS.tolist()}]}
        return httpx.post(f"{self.ingress}/v2/models/{app}/infer", json=body, timeout=timeout)


def descendants(root: int) -> set[int]:
    found = {root}
    changed = True
    while changed:
        changed = False
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if parent in found and int(entry.name) not in found:
                found.add(int(entry.name))
                changed = True
    return found
