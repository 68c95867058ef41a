"""The whole stack from nothing: `hydro up` on free ports, with real etcd, Envoys and runtimes.

``mesh`` is one `hydro up` per test module; on teardown it is stopped with SIGTERM and nothing it started may be
left running.
"""

from __future__ import annotations

import runpy
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydro_mesh import EXAMPLE, Mesh, running_mesh


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("iris")
    shutil.copy(EXAMPLE / "serving.yaml", folder / "serving.yaml")
    runpy.run_path(str(EXAMPLE / "train.py"))["train"](folder)
    return folder


@pytest.fixture(scope="module")
def mesh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """`hydro up`; parametrize indirectly with "sotw" or "delta" to choose the ADS flavour (default sotw)."""
    with running_mesh(tmp_path_factory.mktemp("hydro"), getattr(request, "param", "sotw")) as mesh:
        yield mesh
