"""The pipeline runtime's shadow worker survives its spawn while gRPC is busy in the runtime.

The pipeline runtime starts its shadow worker with asyncio.create_subprocess_exec (a fork, then an exec) while its
gRPC server, its stage channel and its span exporter run. grpcio's fork handlers, on unless
GRPC_ENABLE_FORK_SUPPORT is off, killed such a child (SIGSEGV) before its exec: with tracing on, about every
second pipeline runtime lost its first worker. runtimes/__init__ turns them off. Measured with the probe importing
gRPC first (the runtime before the fix): 4 of 120 children died (-11); with the runtime's import order 0 of 120.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PROBE = Path(__file__).with_name("shadow_spawn_probe.py")
CHILDREN = 150


def test_children_spawned_while_grpc_is_busy_all_reach_exec() -> None:
    env = dict(os.environ)
    # The test process itself imported runtimes: the probe must choose the setting on its own.
    env.pop("GRPC_ENABLE_FORK_SUPPORT", None)
    probe = subprocess.run(
        [sys.executable, str(PROBE), str(CHILDREN)], env=env, capture_output=True, text=True, timeout=240
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    codes = json.loads(probe.stdout.strip().splitlines()[-1])["exit_codes"]
    assert codes == [0] * CHILDREN
