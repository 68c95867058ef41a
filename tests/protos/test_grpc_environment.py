"""Every package that starts a process puts our gRPC settings in the environment before grpc is imported, and an
operator's own GRPC_EXPERIMENTS wins (protos/grpc_environment.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from protos.grpc_environment import FORK_SUPPORT, IO_ENGINE

PACKAGES = ["runtimes", "runtimes.pipeline", "manager_api", "manager_api.cli", "xds_control"]
NAMES = [FORK_SUPPORT[0], IO_ENGINE[0]]

PROBE = """
import json, os, sys
import {package}
print(json.dumps({{"grpc_imported": "grpc" in sys.modules, "env": {{n: os.environ.get(n) for n in {names!r}}}}}))
"""


def _import_in_child(package: str, preset: dict[str, str]) -> dict[str, object]:
    env = {key: value for key, value in os.environ.items() if key not in NAMES}
    env.update(preset)
    child = subprocess.run(
        [sys.executable, "-c", PROBE.format(package=package, names=NAMES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    result: dict[str, object] = json.loads(child.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("package", PACKAGES)
def test_importing_the_package_sets_the_grpc_settings_before_grpc_is_imported(package: str) -> None:
    result = _import_in_child(package, {})
    assert result["env"] == dict((FORK_SUPPORT, IO_ENGINE))
    # Some entry points import grpc right after the package; the package itself must not have, or grpcio could
    # have started before the settings were there.
    if package in ("runtimes", "manager_api", "xds_control"):
        assert result["grpc_imported"] is False


def test_an_operators_io_engine_wins_even_empty_but_fork_handlers_stay_off() -> None:
    preset = {FORK_SUPPORT[0]: "1", IO_ENGINE[0]: ""}
    assert _import_in_child("runtimes", preset)["env"] == {FORK_SUPPORT[0]: "0", IO_ENGINE[0]: ""}
