"""A real `python -m manager_api` process for tests: start, SIGKILL, restart on the same port, stop.

Also registers small python models, since deployments and applications need registered versions, and serves an
app in this process (``served``) for the tests that reach into it to place a fault exactly, still over HTTP.
"""

from __future__ import annotations

import asyncio
import io
import signal
import socket
import sys
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import aetcd
import httpx
import uvicorn
from starlette.types import ASGIApp

from manager_api.ports import free_port
from manager_api.processes import ChildProcess, http_ok, wait_until

SERVING_YAML = b"""\
runtime: python
files: [model.py]
entrypoint: model:predict
signature:
  inputs: [{name: x, datatype: FP32, shape: [-1]}]
  outputs: [{name: y, datatype: FP32, shape: [-1]}]
"""
MODEL_PY = b"def predict(inputs):\n    return {'y': inputs['x'] * 2}\n"


@contextmanager
def served(app: ASGIApp, timeout: float = 30.0) -> Iterator[httpx.Client]:
    """``app`` served by uvicorn on a free loopback port in a thread of this process (its lifespan run), and a
    client for it; the server is stopped on the way out, also when the test fails."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), timeout, "uvicorn")
        if not server.started:
            raise RuntimeError("uvicorn did not start (its lifespan failed?)")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=timeout) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout)


def tar_gz(members: dict[str, bytes], encoding: str = "utf-8") -> bytes:
    """A .tar.gz of ``members`` (name -> bytes); names written in ``encoding`` (latin-1 for an old system's tar)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", encoding=encoding, errors="surrogateescape") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def python_model_archive(model_py: bytes = MODEL_PY) -> bytes:
    """A .tar.gz of a one-function python model (no framework: registration needs no signature check); another
    ``model_py`` makes another archive, with a digest of its own."""
    return tar_gz({"serving.yaml": SERVING_YAML, "model.py": model_py})


class ManagerUnderTest:
    """One manager on a fixed port; ``kill`` + ``start`` is a crash and restart with the same data dir."""

    def __init__(
        self,
        etcd_endpoint: str,
        prefix: str,
        data_dir: Path,
        tokens_file: Path | None = None,
        port: int = 0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.etcd_endpoint = etcd_endpoint
        self.extra_args = extra_args
        self.prefix = prefix
        self.data_dir = data_dir
        self.tokens_file = tokens_file
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = self.url + "/api/v1"
        self._process: ChildProcess | None = None
        self.starts = 0

    def start(self, timeout: float = 60.0) -> ManagerUnderTest:
        """Start (or restart) the process and wait until /healthz answers."""
        self.starts += 1
        argv = [
            *(sys.executable, "-m", "manager_api", "--etcd", self.etcd_endpoint, "--prefix", self.prefix),
            *("--data-dir", str(self.data_dir), "--port", str(self.port), "--log-level", "warning"),
        ]
        if self.tokens_file is not None:
            argv += ["--tokens", str(self.tokens_file)]
        argv += self.extra_args
        self._process = ChildProcess(f"manager_api#{self.starts}", argv, log_path=self.data_dir / "manager.log")
        self._process.start()
        self._process.wait_ready(lambda: http_ok(f"{self.url}/healthz"), timeout)
        return self

    def kill(self) -> None:
        """SIGKILL the process group: no graceful shutdown, in-flight requests are cut."""
        if self._process is not None:
            self._process.signal_group(signal.SIGKILL)
            self._process.stop(grace=5.0)

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()

    def healthy(self) -> bool:
        try:
            return http_ok(f"{self.url}/healthz")
        except httpx.HTTPError:
            return False

    def __enter__(self) -> ManagerUnderTest:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


def register_model(http: httpx.Client, name: str) -> dict[str, Any]:
    """Register the next version of a python model ``name`` through ``http`` (based at /api/v1)."""
    response = http.post(f"/models/{name}/versions", files={"archive": ("model.tar.gz", python_model_archive())})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def etcd_read(endpoint: str, key: str) -> tuple[bytes, int] | None:
    """The value and mod_revision of ``key``, read from etcd itself (not through the manager)."""

    async def read() -> tuple[bytes, int] | None:
        host, port = endpoint.rsplit(":", 1)
        async with aetcd.Client(host=host, port=int(port)) as client:
            result = await client.get(key.encode())
            return None if result is None else (result.value, result.mod_revision)

    return asyncio.run(read())


def etcd_prefix_items(endpoint: str, prefix: str) -> dict[str, tuple[bytes, int]]:
    """Every key under ``prefix`` with its value and mod_revision, read from etcd itself."""

    async def read() -> dict[str, tuple[bytes, int]]:
        host, port = endpoint.rsplit(":", 1)
        async with aetcd.Client(host=host, port=int(port)) as client:
            return {kv.key.decode(): (kv.value, kv.mod_revision) for kv in await client.get_prefix(prefix.encode())}

    return asyncio.run(read())


def raw_request(port: int, head: str, body: bytes = b"", timeout: float = 10.0) -> tuple[int, bytes]:
    """Send ``head`` (request line and headers, each ending in CRLF) and ``body`` to 127.0.0.1:``port`` on a fresh
    connection; the status and body answered. The body may be shorter than the Content-Length declared: then
    TimeoutError says the manager waited for the rest instead of answering."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        received = b""
        while b"\r\n\r\n" not in received or len(received) < _response_end(received):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    head_bytes, _, payload = received.partition(b"\r\n\r\n")
    return int(head_bytes.split()[1]), payload


def _response_end(received: bytes) -> int:
    """Where a response with a Content-Length ends (its head is complete in ``received``)."""
    head, _, _ = received.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return len(head) + 4 + length


def etcd_put(endpoint: str, key: str, value: bytes) -> None:
    """Write ``value`` at ``key`` in etcd itself, as an operator with etcdctl would (no checks)."""

    async def write() -> None:
        host, port = endpoint.rsplit(":", 1)
        async with aetcd.Client(host=host, port=int(port)) as client:
            await client.put(key.encode(), value)

    asyncio.run(write())
