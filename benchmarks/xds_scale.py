"""How xds_control scales: 100, 1,000 and 10,000 deployments (3 endpoints each) served to a real ingress Envoy.

For each N, in one run on this machine:
- snapshot build time and size (in-process: etcd values -> Topology -> ingress snapshot, median of 3);
- time from starting the ingress Envoy until it has acknowledged CDS, EDS, LDS and RDS (state of the world and
  delta, each with its own xds_control and Envoy on the same etcd);
- one endpoint change: resources and bytes sent and time until Envoy acknowledged it, SotW vs delta;
- propagation: from an etcd write creating an application to the ingress routing it (p50/p99, SotW).

    python benchmarks/xds_scale.py [--quick] [--sizes 100,1000,10000]

The last line printed is a JSON object of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.project import enter_project_venv

enter_project_venv()
# Before gRPC is imported: this process forks children while gRPC runs, and its gRPC calls should cost what the
# mesh's own processes' do (protos/grpc_environment.py).
from protos.grpc_environment import apply_grpc_defaults  # noqa: E402

apply_grpc_defaults()

import aetcd  # noqa: E402
import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from manager_api.etcd_server import EtcdServer  # noqa: E402
from manager_api.ports import free_port  # noqa: E402
from manager_api.processes import ChildProcess, wait_until  # noqa: E402
from protos.topology.applications import Application, Stage, Variant  # noqa: E402
from protos.topology.deployments import Deployment  # noqa: E402
from protos.topology.instances import Instance  # noqa: E402
from protos.topology.keys import Keys  # noqa: E402
from protos.topology.models import Artifact, ModelVersion, Signature, TensorSpec  # noqa: E402
from protos.topology.proxies import ProxyStatus  # noqa: E402
from xds_control.bootstrap import envoy_ready, ingress_envoy  # noqa: E402
from xds_control.topology import Topology  # noqa: E402
from xds_control.translate import NodeInfo, ingress_snapshot  # noqa: E402

T = TypeVar("T")
ENDPOINTS = 3
SIGNATURE = Signature(
    inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 4])],
    outputs=[TensorSpec(name="y", datatype="INT64", shape=[-1])],
)
ARTIFACT = Artifact(digest="sha256:" + "0" * 64, uri="file:///nowhere", size=0)
EDS = "ClusterLoadAssignment"


def records(keys: Keys, count: int) -> dict[str, str]:
    """``count`` deployed model versions with 3 ready instances each (the instances need not listen)."""
    out: dict[str, str] = {}
    for index in range(count):
        model = f"m{index}"
        out[keys.model_version(model, 1)] = ModelVersion(
            name=model, version=1, runtime="sklearn", artifact=ARTIFACT, signature=SIGNATURE
        ).model_dump_json()
        out[keys.deployment(model, 1)] = Deployment(model=model, version=1, replicas=ENDPOINTS).model_dump_json()
        for replica in range(ENDPOINTS):
            out[keys.instance(model, 1, f"i{replica}")] = _instance(model, replica, 20000 + replica)
    return out


def _instance(model: str, replica: int, port: int) -> str:
    return Instance(
        model=model, version=1, id=f"i{replica}", node="bench", address="127.0.0.1", port=port
    ).model_dump_json()


class Etcd:
    """A client for the benchmark's writes and reads, on a loop of its own."""

    def __init__(self, endpoint: str) -> None:
        host, port = endpoint.rsplit(":", 1)
        self.loop = asyncio.new_event_loop()
        self.client = aetcd.Client(host=host, port=int(port), timeout=60)
        self.run(self.client.connect())

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def put_many(self, items: dict[str, str], batch: int = 100) -> None:
        async def write() -> None:
            pairs = list(items.items())
            tx = self.client.transactions
            for start in range(0, len(pairs), batch):
                ops = [tx.put(k.encode(), v.encode()) for k, v in pairs[start : start + batch]]
                await self.client.transaction(compare=[], success=ops, failure=[])

        self.run(write())

    def put(self, key: str, value: str) -> None:
        self.run(self.client.put(key.encode(), value.encode()))

    def proxy(self, keys: Keys, node_id: str) -> ProxyStatus | None:
        result = self.run(self.client.get(keys.proxy(node_id).encode()))
        return None if result is None else ProxyStatus.model_validate_json(result.value)

    def close(self) -> None:
        self.run(self.client.close())
        self.loop.close()


def build_figures(keys: Keys, kvs: dict[str, str]) -> tuple[float, int]:
    """Median seconds to go from etcd values to the ingress snapshot, and the snapshot's size in bytes."""
    raw = {k: v.encode() for k, v in kvs.items()}
    node = NodeInfo(node_id="ingress", role="ingress", metadata={"listen_address": "127.0.0.1", "listen_port": 1})
    times = []
    size = 0
    for _ in range(3):
        started = time.perf_counter()
        snapshot = ingress_snapshot(Topology.from_kvs(keys, raw, 1), node)
        times.append(time.perf_counter() - started)
        size = sum(len(data) for items in snapshot.by_type.values() for data in items.values())
    return statistics.median(times), size


class Plane:
    """One xds_control (with /metrics) and one ingress Envoy speaking SotW or delta to it."""

    def __init__(self, etcd: EtcdServer, keys: Keys, api_type: str, node_id: str, work: Path) -> None:
        self.keys = keys
        self.node_id = node_id
        self.xds_port, self.metrics_port = free_port(), free_port()
        self.listen_port, self.admin_port = free_port(), free_port()
        self.xds = ChildProcess(
            f"xds-{node_id}",
            [
                *(sys.executable, "-m", "xds_control", "--etcd", etcd.endpoint, "--prefix", keys.prefix),
                *("--port", str(self.xds_port), "--metrics-port", str(self.metrics_port), "--log-level", "WARNING"),
            ],
            log_path=work / f"xds-{node_id}.log",
        )
        self.envoy = ingress_envoy(
            work / node_id,
            admin_port=self.admin_port,
            xds_port=self.xds_port,
            listen_port=self.listen_port,
            node_id=node_id,
            ads_api_type=api_type,
        )

    def start_control_plane(self) -> None:
        self.xds.start()
        self.xds.wait_ready(lambda: httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics").is_success, 60)

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        wanted = sorted(labels.items())
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sorted(sample.labels.items()) == wanted:
                    return float(sample.value)
        return 0.0

    def stop(self) -> None:
        self.envoy.stop()
        self.xds.stop()


def initial_ack_seconds(plane: Plane, etcd: Etcd, expected_types: int = 4, timeout: float = 120) -> float:
    """Seconds from starting Envoy until the proxy record shows every type acknowledged."""
    started = time.monotonic()
    plane.envoy.start()

    def acked() -> bool:
        status = etcd.proxy(plane.keys, plane.node_id)
        return status is not None and len(status.acked) >= expected_types

    wait_until(acked, timeout, f"{plane.node_id} acknowledging its initial config", interval=0.02)
    elapsed = time.monotonic() - started
    plane.envoy.wait_ready(lambda: envoy_ready(plane.admin_port), 30)
    return elapsed


def endpoint_change(plane: Plane, etcd: Etcd, model: str, port: int) -> tuple[float, float, float]:
    """Move one endpoint; return (resources sent, bytes sent, seconds until Envoy acknowledged it)."""
    before = etcd.proxy(plane.keys, plane.node_id)
    assert before is not None
    resources_before = plane.metric("hydro_xds_response_resources_sum", type=EDS)
    bytes_before = plane.metric("hydro_xds_response_bytes_sum", type=EDS)
    started = time.monotonic()
    etcd.put(plane.keys.instance(model, 1, "i0"), _instance(model, 0, port))

    def acked() -> bool:
        status = etcd.proxy(plane.keys, plane.node_id)
        return status is not None and status.acked.get(EDS) != before.acked.get(EDS)

    wait_until(acked, 60, "the endpoint change acknowledged", interval=0.01)
    elapsed = time.monotonic() - started
    return (
        plane.metric("hydro_xds_response_resources_sum", type=EDS) - resources_before,
        plane.metric("hydro_xds_response_bytes_sum", type=EDS) - bytes_before,
        elapsed,
    )


def propagation_ms(plane: Plane, etcd: Etcd, samples: int, count: int) -> list[float]:
    """Write a new application and time until the ingress routes it (404 "no application" turns into 503)."""
    url = f"http://127.0.0.1:{plane.listen_port}/v2/models/{{app}}/infer"
    results = []
    with httpx.Client(timeout=5) as http:
        for sample in range(samples):
            app = f"probe{sample}"
            target = f"m{sample % count}"
            record = Application(name=app, stages=[Stage(variants=[Variant(model=target, version=1, weight=100)])])
            started = time.monotonic()
            etcd.put(plane.keys.application(app), record.model_dump_json())
            while http.post(url.format(app=app), json={}).status_code == 404:
                time.sleep(0.002)  # poll interval: leave the CPU to Envoy and xds_control
                if time.monotonic() - started > 30:
                    raise TimeoutError(f"{app} was not routed within 30 s")
            results.append((time.monotonic() - started) * 1000)
    return results


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(size: int, work: Path, samples: int, changes: int, log: Callable[[str], None]) -> dict[str, float]:
    figures: dict[str, float] = {}
    keys = Keys(f"/bench{size}/")
    kvs = records(keys, size)
    build_s, snapshot_bytes = build_figures(keys, kvs)
    figures[f"snapshot_build_ms_{size}"] = round(build_s * 1000, 2)
    figures[f"snapshot_bytes_{size}"] = snapshot_bytes
    log(f"N={size}: snapshot build {build_s * 1000:.1f} ms, {snapshot_bytes / 1e6:.2f} MB")

    etcd_server = EtcdServer(work / f"etcd{size}", free_port()).start()
    etcd = Etcd(etcd_server.endpoint)
    planes: list[Plane] = []
    try:
        started = time.monotonic()
        etcd.put_many(kvs)
        log(f"N={size}: wrote {len(kvs)} keys in {time.monotonic() - started:.1f} s")
        for mode, api_type in (("sotw", "GRPC"), ("delta", "DELTA_GRPC")):
            plane = Plane(etcd_server, keys, api_type, f"ingress-{mode}", work / f"n{size}")
            planes.append(plane)
            plane.start_control_plane()
            ack = initial_ack_seconds(plane, etcd)
            figures[f"initial_ack_s_{mode}_{size}"] = round(ack, 3)
            sent = [endpoint_change(plane, etcd, f"m{i % size}", 21000 + i + 100 * len(planes)) for i in range(changes)]
            figures[f"endpoint_change_resources_{mode}_{size}"] = statistics.median(s[0] for s in sent)
            figures[f"endpoint_change_bytes_{mode}_{size}"] = statistics.median(s[1] for s in sent)
            figures[f"endpoint_change_ms_{mode}_{size}"] = round(statistics.median(s[2] for s in sent) * 1000, 1)
            log(
                f"N={size} {mode:5s}: initial ACK {ack:.2f} s; one endpoint change sends "
                f"{figures[f'endpoint_change_resources_{mode}_{size}']:.0f} resources, "
                f"{figures[f'endpoint_change_bytes_{mode}_{size}']:.0f} bytes, "
                f"ACKed in {figures[f'endpoint_change_ms_{mode}_{size}']:.0f} ms"
            )
            if mode == "sotw":
                converged = plane.metric("hydro_xds_convergence_seconds_count")
                converged_s = plane.metric("hydro_xds_convergence_seconds_sum")
                builds = plane.metric("hydro_xds_snapshot_build_seconds_count")
                builds_s = plane.metric("hydro_xds_snapshot_build_seconds_sum")
                delays = propagation_ms(plane, etcd, samples, size)
                figures[f"convergence_mean_ms_{size}"] = round(
                    (plane.metric("hydro_xds_convergence_seconds_sum") - converged_s)
                    * 1000
                    / max(1.0, plane.metric("hydro_xds_convergence_seconds_count") - converged),
                    1,
                )
                figures[f"push_build_mean_ms_{size}"] = round(
                    (plane.metric("hydro_xds_snapshot_build_seconds_sum") - builds_s)
                    * 1000
                    / max(1.0, plane.metric("hydro_xds_snapshot_build_seconds_count") - builds),
                    1,
                )
                figures[f"propagation_p50_ms_{size}"] = round(percentile(delays, 0.5), 1)
                figures[f"propagation_p99_ms_{size}"] = round(percentile(delays, 0.99), 1)
                log(
                    f"N={size}: propagation etcd write -> ingress routes it: "
                    f"p50 {figures[f'propagation_p50_ms_{size}']} ms, p99 {figures[f'propagation_p99_ms_{size}']} ms "
                    f"(xds_control: rebuild {figures[f'push_build_mean_ms_{size}']} ms, "
                    f"first etcd event to ACK {figures[f'convergence_mean_ms_{size}']} ms, means)"
                )
            plane.stop()
    finally:
        for plane in planes:
            plane.stop()
        etcd.close()
        etcd_server.stop()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples (finishes within 3 minutes)")
    parser.add_argument("--sizes", default="100,1000,10000", help="deployment counts, comma-separated")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    samples, changes = (20, 3) if args.quick else (100, 7)
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="hydro-xds-scale-") as tmp:
        for size in sizes:
            figures.update(measure(size, Path(tmp), samples, changes, print))
    if 10000 in sizes:
        figures["initial_ack_s_10000"] = max(figures["initial_ack_s_sotw_10000"], figures["initial_ack_s_delta_10000"])
    largest = max(sizes)
    figures["delta_resources_per_endpoint_change"] = figures[f"endpoint_change_resources_delta_{largest}"]
    figures["sotw_resources_per_endpoint_change"] = figures[f"endpoint_change_resources_sotw_{largest}"]
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
