"""A small mesh on free loopback ports, without the manager: xds_control, the ingress Envoy, and replicas of one
model version (runtime + sidecar, started by the deployer's Replica and registered under a lease), with the test
writing the etcd records itself.

Used by the xds_control policy and header-less gRPC tests and by the tracing tests; tests of the whole product
(the manager, `hydro up`) use tests/hydro_mesh.py instead.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import uuid
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aetcd
from pydantic import BaseModel

from manager_api.deployer.registration import LeasedInstanceRegistry
from manager_api.deployer.replica import Replica, ReplicaConfig
from manager_api.ports import free_port
from manager_api.processes import ChildProcess
from protos.topology.applications import Application, Stage, Variant
from protos.topology.deployments import Deployment
from protos.topology.keys import Keys
from protos.topology.models import Artifact, ModelVersion, Signature
from xds_control.bootstrap import envoy_ready, ingress_envoy

T = TypeVar("T")


@dataclass
class IngressStack:
    """The running stack: the ingress's ports, the etcd client and key layout, and the replicas started so far."""

    work: Path
    keys: Keys
    etcd: aetcd.Client
    #: The registry's lease keep-alive runs here, on a thread, while the test blocks on its calls.
    loop: asyncio.AbstractEventLoop
    registry: LeasedInstanceRegistry
    xds: ChildProcess
    xds_port: int
    listen_port: int
    admin_port: int
    replicas: list[Replica] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the stack's loop."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(90)

    def put(self, records: Mapping[str, BaseModel]) -> None:
        """Write records (by key) to etcd."""
        for key, record in records.items():
            self.run(self.etcd.put(key.encode(), record.model_dump_json().encode()))

    def put_model(
        self,
        model: str,
        version: int,
        signature: Signature,
        *,
        app: str | None = None,
        deployment: Deployment | None = None,
    ) -> None:
        """A python model version (its artifact is never fetched: replicas get their folder), the application
        ``app`` with it as its one variant, and ``deployment`` if given."""
        artifact = Artifact(digest="sha256:" + "0" * 64, uri="file:///nowhere", size=0)
        records: dict[str, BaseModel] = {
            self.keys.model_version(model, version): ModelVersion(
                name=model, version=version, runtime="python", artifact=artifact, signature=signature
            )
        }
        if app is not None:
            variant = Variant(model=model, version=version, weight=100)
            records[self.keys.application(app)] = Application(name=app, stages=[Stage(variants=[variant])])
        if deployment is not None:
            records[self.keys.deployment(model, version)] = deployment
        self.put(records)

    def start_replicas(
        self, model: str, version: int, model_dirs: Sequence[Path], env: Mapping[str, str] | None = None
    ) -> list[Replica]:
        """One replica per model folder, started together and ready; ``env`` replaces the environment their
        runtimes inherit (a Replica starts its runtime with this process's environment)."""
        started = [
            Replica(
                ReplicaConfig(
                    model=model,
                    version=version,
                    model_dir=folder,
                    node="tests",
                    xds_host="127.0.0.1",
                    xds_port=self.xds_port,
                    workdir=self.work / f"replica-{len(self.replicas) + index}",
                    drain_seconds=0,
                ),
                self.registry,
            )
            for index, folder in enumerate(model_dirs)
        ]
        self.replicas.extend(started)
        saved = dict(os.environ)
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        try:
            # Together: most of a start is Python imports and the sidecar's first config.
            self.run(_gather(*(replica.start() for replica in started)))
        finally:
            os.environ.clear()
            os.environ.update(saved)
        return started


async def _gather(*coroutines: Coroutine[Any, Any, None]) -> None:
    await asyncio.gather(*coroutines)


@contextmanager
def ingress_stack(
    etcd_endpoint: str, work: Path, *, xds_args: Sequence[str] = (), xds_env: Mapping[str, str] | None = None
) -> Iterator[IngressStack]:
    """xds_control (with ``xds_args``, and ``xds_env`` as its environment if given) and the ingress Envoy, ready,
    under a fresh etcd prefix; on exit every replica started through the stack, the ingress and xds_control stop
    (each step on its own, so one failing does not leave the next ones' processes running)."""
    host, _, port = etcd_endpoint.rpartition(":")
    keys = Keys(f"/hydro-tests-{uuid.uuid4().hex[:8]}/")
    xds_port, listen_port, admin_port = free_port(), free_port(), free_port()
    argv = [sys.executable, "-m", "xds_control", "--etcd", etcd_endpoint, "--prefix", keys.prefix]
    xds = ChildProcess(
        "xds_control", [*argv, "--port", str(xds_port), *xds_args], env=xds_env, log_path=work / "xds.log"
    )
    ingress = ingress_envoy(work, admin_port=admin_port, xds_port=xds_port, listen_port=listen_port)
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, name="ingress-stack-loop", daemon=True)
    loop_thread.start()
    client = aetcd.Client(host=host, port=int(port))
    registry = LeasedInstanceRegistry(client, keys, node="tests")
    stack = IngressStack(work, keys, client, loop, registry, xds, xds_port, listen_port, admin_port)
    try:
        xds.start()
        ingress.start()
        stack.run(client.connect())
        stack.run(registry.start())
        ingress.wait_ready(lambda: envoy_ready(admin_port), 30)
        yield stack
    finally:
        steps = [*(replica.stop(drain=False) for replica in stack.replicas), registry.stop(), client.close()]
        for step in steps:
            try:
                stack.run(step)
            except Exception as exc:
                print(f"teardown step failed: {exc!r}")
        # The processes first: a loop thread that does not stop in time must not leave them running.
        ingress.stop()
        xds.stop()
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(10)
        loop.close()
        print(xds.log_tail(30))
