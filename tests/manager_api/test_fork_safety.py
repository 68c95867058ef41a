"""Children started by our processes survive the fork while gRPC (aetcd) is busy in another thread.

ChildProcess forks (its preexec_fn rules out vfork), so fork handlers run in the child before its exec. grpcio
registers such handlers unless GRPC_ENABLE_FORK_SUPPORT is off, and they kill some children (SIGSEGV, SIGABRT)
before exec; manager_api/__init__ turns them off. Measured with fork_probe.py importing grpc first instead:
7 of 80 children died (-11, -6); with the product's import order, 0 of 200.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from manager_api.etcd_server import EtcdServer

PROBE = Path(__file__).with_name("fork_probe.py")
CHILDREN = 60


def test_children_spawned_during_etcd_calls_all_reach_exec(etcd_server: EtcdServer, etcd_prefix: str) -> None:
    env = dict(os.environ)
    # The test process itself imported manager_api: the probe must choose the setting on its own.
    env.pop("GRPC_ENABLE_FORK_SUPPORT", None)
    probe = subprocess.run(
        [sys.executable, str(PROBE), etcd_server.host, str(etcd_server.client_port), etcd_prefix, str(CHILDREN)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    codes = json.loads(probe.stdout.strip().splitlines()[-1])["exit_codes"]
    assert codes == [0] * CHILDREN
