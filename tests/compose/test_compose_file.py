"""compose/docker-compose.yml checked without a Docker engine (none runs here, and `docker compose` is not
installed): every command is one of this repository's entry points and parses with its own parser, the addresses
and ports the services give each other line up (the ingress bootstrap rendered from its command included), and
every process sends spans to the Jaeger service's OTLP port. What only a Docker engine can show (images build,
containers start, a request goes through) is listed as untested in compose/README.md."""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from manager_api import __main__ as manager_main
from manager_api import credentials
from manager_api.auth import TokenStore
from manager_api.etcd_server import EtcdServer
from manager_api.ports import free_port
from manager_api.processes import ChildProcess, wait_until
from tracing.settings import TracingSettings
from xds_control import __main__ as xds_main
from xds_control import ingress
from xds_control.bootstrap import envoy_ready

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose" / "docker-compose.yml"
#: What each service built from the project image runs (``python -m MODULE``), and the parser of that module.
ENTRY_POINTS = {
    "credentials": ("manager_api.credentials", credentials.parse_args),
    "xds_control": ("xds_control", xds_main.parse_args),
    "manager": ("manager_api", manager_main.parse_args),
    "ingress": ("xds_control.ingress", ingress.parse_args),
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def _service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    service: dict[str, Any] = compose["services"][name]
    return service


def _args(compose: dict[str, Any], name: str) -> list[str]:
    command = [str(part) for part in _service(compose, name)["command"]]
    module, _ = ENTRY_POINTS[name]
    assert command[:3] == ["python", "-m", module], command
    return command[3:]


def _ip(compose: dict[str, Any], name: str) -> str:
    return str(_service(compose, name)["networks"]["hydro"]["ipv4_address"])


def _published(compose: dict[str, Any], name: str) -> dict[int, int]:
    """Container port -> host port."""
    ports = {}
    for spec in _service(compose, name).get("ports", []):
        host, container = str(spec).split(":")
        ports[int(container)] = int(host)
    return ports


@pytest.fixture
def compose_env(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """This process's environment as the project's containers have it (xds_control's parser reads OTEL_*)."""
    environment = {str(k): str(v) for k, v in _service(compose, "xds_control")["environment"].items()}
    for key in [k for k in os.environ if k.startswith("OTEL_")]:
        monkeypatch.delenv(key)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    yield environment


def test_the_stack_has_the_services_design_md_names(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"etcd", "jaeger", "credentials", "xds_control", "manager", "ingress"}
    jaeger = _service(compose, "jaeger")
    # A pinned release (Jaeger v1's last), not :latest, whose meaning moves; it is the image README.md names too.
    assert jaeger["image"] == "jaegertracing/all-in-one:1.76.0"
    assert jaeger["image"] in (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert str(jaeger["environment"]["COLLECTOR_OTLP_ENABLED"]) == "true"


def test_every_project_service_runs_an_entry_point_of_this_repository_with_arguments_it_accepts(
    compose: dict[str, Any], compose_env: dict[str, str]
) -> None:
    for name, (_module, parse_args) in ENTRY_POINTS.items():
        service = _service(compose, name)
        assert service["image"] == "hydro-serving:dev"
        dockerfile = ROOT / "compose" / service["build"]["context"] / service["build"]["dockerfile"]
        assert dockerfile.resolve() == ROOT / "compose" / "Dockerfile", name
        parse_args(_args(compose, name))  # exits (SystemExit) on an option the entry point does not have


def test_every_process_sends_spans_to_the_jaeger_service(compose: dict[str, Any], compose_env: dict[str, str]) -> None:
    collector = TracingSettings.from_environ(compose_env).collector
    assert collector is not None
    assert (collector.host, collector.port, collector.secure) == ("jaeger", 4317, False)
    assert "4317" in [str(port) for port in _service(compose, "jaeger")["expose"]]
    for name in ("xds_control", "manager", "ingress", "credentials"):
        assert _service(compose, name)["environment"] == compose_env, name
    # xds_control gives the same collector to every Envoy it configures.
    envoys = xds_main.parse_args(_args(compose, "xds_control")).tracing
    assert envoys is not None and envoys.collector == collector


def test_addresses_and_ports_line_up(compose: dict[str, Any], compose_env: dict[str, str]) -> None:
    subnet = ipaddress.ip_network(compose["networks"]["hydro"]["ipam"]["config"][0]["subnet"])
    for name, service in compose["services"].items():
        address = service["networks"]["hydro"]["ipv4_address"] if isinstance(service["networks"], dict) else None
        assert address is None or ipaddress.ip_address(address) in subnet, name
    xds = xds_main.parse_args(_args(compose, "xds_control"))
    manager = manager_main.parse_args(_args(compose, "manager"))
    edge = ingress.parse_args(_args(compose, "ingress"))
    etcd_urls = [arg for arg in _service(compose, "etcd")["command"] if arg.startswith("--listen-client-urls=")]
    etcd_port = int(etcd_urls[0].rsplit(":", 1)[1])
    assert xds.etcd == f"etcd:{etcd_port}" and manager.etcd == ("etcd", etcd_port)
    assert xds.host == "0.0.0.0" and manager.host == "0.0.0.0"
    # Sidecars and the ingress reach xds_control through Envoy's static cluster: its fixed IP and ADS port.
    assert manager.xds == (_ip(compose, "xds_control"), xds.port)
    assert (edge.xds_host, edge.xds_port) == (_ip(compose, "xds_control"), xds.port)
    assert manager.advertise_address == _ip(compose, "manager")
    assert manager.deployer == "process"
    # The manager's published port is the one it serves on; the ingress's, the one its listener binds.
    assert _published(compose, "manager") == {manager.port: 8081}
    assert _published(compose, "ingress") == {edge.listen_port: 8080}
    # The manager reads the tokens the credentials service writes, through the same host folder.
    made = credentials.parse_args(_args(compose, "credentials"))
    assert manager.tokens == made.data_dir / credentials.TOKENS_FILE
    for name in ("credentials", "manager"):
        mounts = {m.split(":")[0]: m.split(":")[1] for m in _service(compose, name)["volumes"]}
        assert mounts["./secrets"] == str(made.data_dir), name


def test_the_ingress_bootstrap_rendered_from_the_compose_command_points_at_xds_control(
    compose: dict[str, Any],
) -> None:
    bootstrap = yaml.safe_load(ingress.bootstrap_of(ingress.parse_args(_args(compose, "ingress"))))
    (xds_cluster,) = bootstrap["static_resources"]["clusters"]
    (endpoint,) = xds_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert (address["address"], address["port_value"]) == (_ip(compose, "xds_control"), 18000)
    assert bootstrap["node"]["metadata"] == {"role": "ingress", "listen_address": "0.0.0.0", "listen_port": 8080}


def test_the_ingress_entry_point_becomes_an_envoy_that_takes_its_config_from_xds_control(
    etcd_server: EtcdServer, etcd_prefix: str, tmp_path: Path
) -> None:
    xds_port, listen_port, admin_port = free_port(), free_port(), free_port()
    xds_argv = [sys.executable, "-m", "xds_control", "--etcd", etcd_server.endpoint, "--prefix", etcd_prefix]
    xds = ChildProcess("xds_control", [*xds_argv, "--port", str(xds_port)], log_path=tmp_path / "xds.log")
    argv = [sys.executable, "-m", "xds_control.ingress", "--xds-host", "127.0.0.1", "--xds-port", str(xds_port)]
    argv += ["--listen-address", "127.0.0.1", "--listen-port", str(listen_port), "--admin-port", str(admin_port)]
    argv += ["--config", str(tmp_path / "ingress.yaml")]
    edge = ChildProcess("ingress", argv, log_path=tmp_path / "ingress.log")
    try:
        xds.start()
        edge.start()
        edge.wait_ready(lambda: envoy_ready(admin_port), 60)
        # The process is Envoy itself now (exec), serving the listener xds_control built from its metadata.
        assert Path(f"/proc/{edge.pid}/exe").resolve().name == "envoy"
        wait_until(lambda: _answers(f"http://127.0.0.1:{listen_port}/v2/models/none/ready"), 30, "the listener")
    finally:
        edge.stop()
        xds.stop()


def _answers(url: str) -> bool:
    try:
        # No such model: the ingress's own 404, which only a configured listener gives.
        return httpx.get(url, timeout=2).status_code == 404
    except httpx.HTTPError:
        return False


def test_the_ingress_entry_point_refuses_a_host_name_for_xds_control(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exited:
        ingress.parse_args(["--xds-host", "xds_control"])
    assert exited.value.code == 2


def test_the_credentials_entry_point_makes_a_token_the_manager_accepts_and_keeps_it(tmp_path: Path) -> None:
    credentials.main([str(tmp_path), "http://localhost:8081"])
    first = json.loads((tmp_path / credentials.CREDENTIALS_FILE).read_text())
    credentials.main([str(tmp_path), "http://localhost:8081"])
    again = json.loads((tmp_path / credentials.CREDENTIALS_FILE).read_text())
    assert first == again and first["api_url"] == "http://localhost:8081"
    store = TokenStore.load(tmp_path / credentials.TOKENS_FILE)
    assert first["token"] not in (tmp_path / credentials.TOKENS_FILE).read_text()
    assert store.role_of(first["token"]) == "admin"
