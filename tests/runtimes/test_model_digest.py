"""Model folder digests (runtimes/model_digest.py) and `python -m runtimes --expect-digest` on real processes.

The manager records a folder's digest and manifest at upload; a runtime started with them refuses a folder that
differs, naming the file, before any of the model's code runs.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from manager_api.ports import free_port
from manager_api.processes import ChildProcess, http_ok, wait_until
from runtimes.model_digest import (
    NOT_A_FILE,
    FolderMismatch,
    first_difference,
    folder_digest,
    folder_manifest,
    manifest_digest,
    verify_folder,
)

SERVING_YAML = """\
runtime: python
files: [model.py, helpers/scale.py]
entrypoint: model:predict
signature:
  inputs: [{name: x, datatype: FP32, shape: [-1]}]
  outputs: [{name: y, datatype: FP32, shape: [-1]}]
"""
MODEL_PY = "from helpers.scale import FACTOR\n\n\ndef predict(inputs):\n    return {'y': inputs['x'] * FACTOR}\n"


def model_folder(root: Path) -> Path:
    """A python model with a module in a subfolder."""
    (root / "helpers").mkdir(parents=True)
    (root / "serving.yaml").write_text(SERVING_YAML)
    (root / "model.py").write_text(MODEL_PY)
    (root / "helpers" / "scale.py").write_text("FACTOR = 2\n")
    return root


def test_the_manifest_lists_every_file_by_relative_path(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "m")
    manifest = folder_manifest(folder)
    assert list(manifest) == ["helpers/scale.py", "model.py", "serving.yaml"]
    assert all(len(h) == 64 for h in manifest.values())


def test_the_digest_depends_on_names_and_contents_only(tmp_path: Path) -> None:
    a, b = model_folder(tmp_path / "a"), model_folder(tmp_path / "b")
    os.utime(b / "model.py", (0, 0))
    (b / "empty-dir").mkdir()
    assert folder_digest(a) == folder_digest(b)
    assert manifest_digest(dict(reversed(list(folder_manifest(a).items())))) == folder_digest(a)
    (b / "model.py").write_text(MODEL_PY + "\n")
    assert folder_digest(a) != folder_digest(b)
    (b / "model.py").write_text(MODEL_PY)
    (b / "helpers" / "scale.py").rename(b / "helpers" / "scale2.py")
    assert folder_digest(a) != folder_digest(b)


def test_bytecode_caches_are_not_part_of_the_model(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "m")
    before = folder_digest(folder)
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "model.cpython-312.pyc").write_bytes(b"\0" * 16)
    assert folder_digest(folder) == before


def test_a_link_is_an_entry_that_never_matches_a_file(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "m")
    expected = folder_manifest(folder)
    (folder / "model.py").unlink()
    (folder / "model.py").symlink_to(tmp_path / "elsewhere.py")
    (folder / "data").symlink_to(tmp_path, target_is_directory=True)
    actual = folder_manifest(folder)
    assert actual["model.py"] == NOT_A_FILE and actual["data"] == NOT_A_FILE
    assert first_difference(expected, actual) == "data is not part of the registered model (extra file)"


def test_the_first_difference_is_named(tmp_path: Path) -> None:
    expected = {"a.py": "1" * 64, "b.py": "2" * 64, "c.py": "3" * 64}
    assert first_difference(expected, dict(expected)) is None
    assert first_difference(expected, {**expected, "b.py": "9" * 64}) == (
        "b.py differs (sha256 999999999999..., registered 222222222222...)"
    )
    assert first_difference(expected, {"a.py": "1" * 64, "c.py": "3" * 64}) == "b.py is missing"
    assert first_difference(expected, {**expected, "aa.py": "4" * 64}) == (
        "aa.py is not part of the registered model (extra file)"
    )


def test_verify_names_the_file_with_the_manifest_and_gives_digests_without(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "m")
    manifest, digest = folder_manifest(folder), folder_digest(folder)
    verify_folder(folder, digest, manifest)
    (folder / "helpers" / "scale.py").write_text("FACTOR = 3\n")
    with pytest.raises(FolderMismatch, match=r"helpers/scale\.py differs"):
        verify_folder(folder, digest, manifest)
    with pytest.raises(FolderMismatch, match=f"its digest is {folder_digest(folder)}"):
        verify_folder(folder, digest)
    # A manifest that is not the registered one (its digest differs) is not trusted to name files.
    with pytest.raises(FolderMismatch, match="its digest is"):
        verify_folder(folder, digest, {**manifest, "x": "0" * 64})


# --- the runtime process ---------------------------------------------------------------------------------------


class Runtimes:
    """Starts `python -m runtimes` processes and stops every one of them, whatever happened."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[ChildProcess] = []

    def start(self, folder: Path, *flags: str) -> tuple[ChildProcess, str]:
        http_port, grpc_port = free_port(), free_port()
        argv = [sys.executable, "-m", "runtimes", "--model-dir", str(folder), "--name", "m", "--version", "1"]
        argv += ["--http-port", str(http_port), "--grpc-port", str(grpc_port), *flags]
        process = ChildProcess(f"runtime-{len(self.started)}", argv, log_path=self.logs / f"{len(self.started)}.log")
        self.started.append(process.start())
        return process, f"http://127.0.0.1:{http_port}"


@pytest.fixture
def runtimes(tmp_path: Path) -> Iterator[Runtimes]:
    launcher = Runtimes(tmp_path / "logs")
    try:
        yield launcher
    finally:
        for process in launcher.started:
            process.stop()


def expect_flags(folder: Path, manifest_file: Path) -> list[str]:
    """The flags a deployer passes for ``folder`` as registered now."""
    manifest_file.write_text(json.dumps(folder_manifest(folder)))
    return ["--expect-digest", folder_digest(folder), "--expect-files", str(manifest_file)]


def test_a_tampered_folder_is_refused_naming_the_file(tmp_path: Path, runtimes: Runtimes) -> None:
    folder = model_folder(tmp_path / "m")
    flags = expect_flags(folder, tmp_path / "expected.json")
    (folder / "model.py").write_text(MODEL_PY.replace("FACTOR}", "FACTOR * 0}"))
    (folder / "serving.yaml").write_text(SERVING_YAML + "# extra\n")
    process, _ = runtimes.start(folder, *flags)
    wait_until(lambda: not process.running, 60, "the runtime to exit")
    assert process.returncode == 1
    refusal = [line for line in process.log_tail(20).splitlines() if "refusing to load" in line]
    assert len(refusal) == 1, process.log_tail(20)
    # The first difference in path order (model.py before serving.yaml), found before any model code ran.
    assert f"does not match its registered digest {flags[1]}: model.py differs" in refusal[0]
    assert not (folder / "__pycache__").exists()


def test_a_missing_file_is_named(tmp_path: Path, runtimes: Runtimes) -> None:
    folder = model_folder(tmp_path / "m")
    flags = expect_flags(folder, tmp_path / "expected.json")
    (folder / "helpers" / "scale.py").unlink()
    process, _ = runtimes.start(folder, *flags)
    wait_until(lambda: not process.running, 60, "the runtime to exit")
    assert process.returncode == 1
    assert "helpers/scale.py is missing" in process.log_tail(20)


def test_a_good_folder_loads_and_stale_bytecode_is_not_trusted(tmp_path: Path, runtimes: Runtimes) -> None:
    folder = model_folder(tmp_path / "m")
    flags = expect_flags(folder, tmp_path / "expected.json")
    # Bytecode is not in the digest: whatever sits in __pycache__ is removed, never imported.
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "model.cpython-312.pyc").write_bytes(b"not bytecode")
    process, url = runtimes.start(folder, *flags)
    wait_until(lambda: not process.running or http_ok(f"{url}/v2/health/ready"), 60, "the runtime ready")
    assert process.running, process.log_tail(30)
    assert not (folder / "__pycache__").exists() and not (folder / "helpers" / "__pycache__").exists()
    body = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}]}
    reply = httpx.post(f"{url}/v2/models/m/infer", json=body, timeout=10)
    assert reply.status_code == 200, reply.text
    assert reply.json()["outputs"][0]["data"] == [2, 4]


def test_a_malformed_digest_flag_is_a_usage_error(tmp_path: Path, runtimes: Runtimes) -> None:
    folder = model_folder(tmp_path / "m")
    process, _ = runtimes.start(folder, "--expect-digest", "md5:abc")
    wait_until(lambda: not process.running, 60, "the runtime to exit")
    assert process.returncode == 2
    assert "--expect-digest must be sha256:<64 lower-case hex digits>, got 'md5:abc'" in process.log_tail(5)


def test_an_unreadable_manifest_is_refused_saying_so(tmp_path: Path, runtimes: Runtimes) -> None:
    folder = model_folder(tmp_path / "m")
    (tmp_path / "expected.json").write_text("[1, 2]")
    process, _ = runtimes.start(
        folder, "--expect-digest", folder_digest(folder), "--expect-files", str(tmp_path / "expected.json")
    )
    wait_until(lambda: not process.running, 60, "the runtime to exit")
    assert process.returncode == 1
    assert "is not a JSON object of path -> sha256 hex" in process.log_tail(5)
