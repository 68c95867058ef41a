"""What every benchmark script needs first: to run in the project's venv, the project root, and the demo model.

Each script starts with ``sys.path.insert(0, <project root>)``, imports this module (standard library only, so
any Python can) and calls ``enter_project_venv()`` before importing anything the venv provides.
"""

from __future__ import annotations

import os
import runpy
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"


def enter_project_venv() -> None:
    """`python benchmarks/NAME.py` with another Python (the system's): run the script again inside the project's
    venv, where `make bench-deps` installed what it needs; then make the project's packages importable."""
    if Path(sys.prefix).resolve() != VENV_PYTHON.parent.parent.resolve() and VENV_PYTHON.exists():
        os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), *sys.argv])
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def write_iris_model(folder: Path) -> Path:
    """The demo iris model (examples/iris, trained here) and its serving.yaml in ``folder``; the model file."""
    shutil.copy(ROOT / "examples" / "iris" / "serving.yaml", folder)
    model_file: Path = runpy.run_path(str(ROOT / "examples" / "iris" / "train.py"))["train"](folder)
    return model_file
