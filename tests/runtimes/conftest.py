"""Session fixtures: the echo runtimes of oip_echo.py (every datatype), shared by conformance and fuzz tests.

Both runtimes are real `python -m runtimes` processes on free ports, stopped at the end of the session.
``echo_mesh`` serves the same two models through a whole `hydro up` stack (ingress, sidecars, deployer), for the
conformance tests that go through the ingress; it starts only if such a test runs.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hydro_mesh import Mesh, running_mesh
from oip_echo import DATATYPES, TYPED_DATATYPES, EchoRuntime, start_echo, write_echo_model

from manager_api.processes import http_ok, wait_until


@pytest.fixture(scope="session")
def echo_runtimes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, EchoRuntime]]:
    """``alltypes`` and ``typed`` echo runtimes, ready."""
    base = tmp_path_factory.mktemp("echo")
    started: list[EchoRuntime] = []
    try:
        # Both start before either is awaited: their imports overlap.
        for name, datatypes in (("alltypes", DATATYPES), ("typed", TYPED_DATATYPES)):
            started.append(start_echo(base / name, name, datatypes, base / "logs"))
        for runtime in started:
            url = f"http://{runtime.http_url}/v2/health/ready"
            wait_until(lambda r=runtime, u=url: not r.process.running or http_ok(u), 60, f"{runtime.name} ready")
            assert runtime.process.running, f"{runtime.name} exited:\n{runtime.log()}"
        yield {runtime.name: runtime for runtime in started}
    finally:
        for runtime in started:
            runtime.process.stop(grace=10)


@pytest.fixture(scope="session")
def alltypes(echo_runtimes: dict[str, EchoRuntime]) -> EchoRuntime:
    return echo_runtimes["alltypes"]


@pytest.fixture(scope="session")
def typed(echo_runtimes: dict[str, EchoRuntime]) -> EchoRuntime:
    return echo_runtimes["typed"]


@pytest.fixture(scope="session")
def echo_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """`hydro up` serving applications ``alltypes`` and ``typed`` (each its echo model, version 1, one replica)."""
    models = tmp_path_factory.mktemp("echo-models")
    with running_mesh(tmp_path_factory.mktemp("echo-mesh")) as mesh:
        for name, datatypes in (("alltypes", DATATYPES), ("typed", TYPED_DATATYPES)):
            version = mesh.api.push_model(name, write_echo_model(models / name, datatypes))["version"]
            mesh.api.deploy(name, version, replicas=1)
            mesh.api.put_application(name, [(name, version, 100)])
        for name in ("alltypes", "typed"):
            url = f"{mesh.ingress}/v2/models/{name}/ready"
            wait_until(lambda u=url: http_ok(u), 120, f"{name} ready through the ingress")
        yield mesh
