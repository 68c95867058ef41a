"""An echo model with one input and one output of every protocol datatype, served by real runtime processes.

``alltypes`` has all thirteen datatypes; ``typed`` has every datatype except FP16, which has no typed gRPC field
(clients can only send it raw), so that typed-contents requests can be tested too. The fixtures are in conftest.py.

Nothing here imports protos.inference_pb2: the tests that use it also use tritonclient (same `inference` package).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from manager_api.ports import free_port
from manager_api.processes import ChildProcess

ROOT = Path(__file__).resolve().parents[2]

DATATYPES = (
    "BOOL",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
)
TYPED_DATATYPES = tuple(d for d in DATATYPES if d != "FP16")

ECHO_MODEL = """
def predict(inputs):
    # in_<type> comes back as out_<type>, unchanged.
    return {"out_" + name[len("in_"):]: value for name, value in inputs.items()}
"""


def input_name(datatype: str) -> str:
    return f"in_{datatype.lower()}"


def output_name(datatype: str) -> str:
    return f"out_{datatype.lower()}"


def serving_yaml(datatypes: tuple[str, ...]) -> str:
    inputs = ", ".join(f"{{name: {input_name(d)}, datatype: {d}, shape: [-1, 2]}}" for d in datatypes)
    outputs = ", ".join(f"{{name: {output_name(d)}, datatype: {d}, shape: [-1, 2]}}" for d in datatypes)
    return (
        "runtime: python\nfiles: [model.py]\nentrypoint: model:predict\n"
        f"signature:\n  inputs: [{inputs}]\n  outputs: [{outputs}]\n"
    )


def sample(datatype: str) -> np.ndarray:
    """A [3, 2] tensor of ``datatype`` with the type's extremes where they survive JSON (finite floats only)."""
    if datatype == "BOOL":
        return np.array([[True, False], [False, True], [True, True]])
    if datatype == "BYTES":
        # UTF-8 text, so the same tensor also travels as JSON strings; includes an empty element and a NUL.
        values = [b"hydro", b"", "h\u00e9llo".encode(), b"a\x00b", b"x" * 40, b"\xe2\x9c\x93"]
        return np.array(values, dtype=np.object_).reshape(3, 2)
    dtype = np.dtype(datatype.lower().replace("fp", "float"))
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.array([[info.min, info.max], [0, 1], [7, 42]], dtype=dtype)
    return np.array([[1.5, -2.25], [0.0, 65504.0], [-0.125, 3.0]], dtype=dtype)


@dataclass
class EchoRuntime:
    """A running echo runtime and how to reach it."""

    process: ChildProcess
    name: str
    datatypes: tuple[str, ...]
    grpc_port: int
    http_port: int

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        assert self.process.log_path is not None
        return self.process.log_path.read_text(errors="replace")


@dataclass(frozen=True)
class EchoTarget:
    """Where the conformance tests reach an echo model: its runtime directly, or the mesh's ingress."""

    name: str
    http_url: str
    grpc_url: str
    #: "direct" or "ingress".
    via: str


def write_echo_model(folder: Path, datatypes: tuple[str, ...]) -> Path:
    """The echo model folder (model.py + serving.yaml) for ``datatypes``."""
    folder.mkdir(parents=True)
    (folder / "model.py").write_text(ECHO_MODEL)
    (folder / "serving.yaml").write_text(serving_yaml(datatypes))
    return folder


def start_echo(folder: Path, name: str, datatypes: tuple[str, ...], logs: Path) -> EchoRuntime:
    write_echo_model(folder, datatypes)
    grpc_port, http_port = free_port(), free_port()
    argv = [sys.executable, "-m", "runtimes", "--model-dir", str(folder), "--name", name, "--version", "1"]
    argv += ["--host", "127.0.0.1", "--grpc-port", str(grpc_port), "--http-port", str(http_port)]
    # A small limit, so the oversized-body cases stay small.
    argv += ["--max-message-mb", "4", "--shutdown-grace", "2"]
    process = ChildProcess(f"runtime-{name}", argv, cwd=ROOT, env=dict(os.environ), log_path=logs / f"{name}.log")
    process.start()
    return EchoRuntime(process, name, datatypes, grpc_port, http_port)
