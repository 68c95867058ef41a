"""The committed Python code and descriptor set for protos/inference.proto are what `make protos` produces today.

The descriptor set is what the ingress Envoy's gRPC field extraction parses requests with: a stale one would
route by fields that moved.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO = "protos/inference.proto"
GENERATED = (
    "inference_pb2.py",
    "inference_pb2.pyi",
    "inference_pb2_grpc.py",
    "inference_pb2_grpc.pyi",
    "inference_descriptor.pb",
)


def _generate(out: Path) -> None:
    # The same command as the Makefile's `protos` target, with the plugins from the venv that runs the tests.
    bin_dir = Path(sys.executable).parent
    argv = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I.",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--mypy_out={out}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--mypy_grpc_out={out}",
        f"--descriptor_set_out={out / 'protos' / 'inference_descriptor.pb'}",
        PROTO,
    ]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"protoc failed: {result.stderr}"


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("protos")
    # protoc writes the descriptor set to the path given, and does not create its folder.
    (out / "protos").mkdir()
    _generate(out)
    return out / "protos"


@pytest.mark.parametrize("name", GENERATED)
def test_generated_file_matches_proto(regenerated: Path, name: str) -> None:
    committed = ROOT / "protos" / name
    assert committed.is_file(), f"protos/{name} is missing: run make protos"
    fresh = (regenerated / name).read_bytes()
    assert committed.read_bytes() == fresh, f"protos/{name} is out of date with {PROTO}: run make protos"
