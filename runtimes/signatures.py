"""Signatures the frameworks know, checked against the one serving.yaml declares.

A framework module may define ``signature_of(model_dir, config) -> Signature | None``: the signature as the model
file itself describes it (an ONNX graph's inputs and outputs, a tree model's feature count). Where the framework
does not know a field it copies the declared one, so ``compare_signatures`` reports only real disagreements:

- a dimension the framework fixes must be declared with that size; a dimension the framework leaves open (-1)
  may be declared with any size;
- ranks and datatypes must be equal; every input the framework needs must be declared, and every declared
  input and output must exist in the model.

The manager calls ``verify_signature`` when a version is registered. Loading a model means running framework
code on an untrusted upload (a joblib file is a pickle), which can crash, hang or take gigabytes; so it happens in a
short-lived child process (``python -m runtimes.signatures DIR``) with a timeout, never in the manager itself.
Runtimes run the same check in ``load()``, so a folder started by hand fails just as clearly.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from protos.topology.models import Signature, TensorSpec
from runtimes.errors import ModelLoadError
from runtimes.serving_config import ServingConfig, ServingConfigError, load_serving_config
from runtimes.tensors import format_shape

#: Kinds whose module can infer a signature. The python runtime cannot (its model is arbitrary code), and Spark
#: models hide their feature count inside arbitrary pipelines, so registering them starts no child process.
INFERRING_KINDS = ("sklearn", "onnx", "xgboost", "lightgbm", "tensorflow")

#: Seconds a registration may spend loading the model to read its signature.
DEFAULT_TIMEOUT = 60.0

#: Exit codes of ``python -m runtimes.signatures``.
EXIT_MISMATCH = 2
EXIT_LOAD_ERROR = 3

SignatureFn = Callable[[Path, ServingConfig], Signature | None]


class SignatureMismatch(ServingConfigError):
    """The declared signature disagrees with the model; the message names the field, e.g. signature.inputs[0]."""


class SignatureCheckFailed(ServingConfigError):
    """The model could not be loaded (or not in time) to read its signature."""


def _field(kind: str, index: int) -> str:
    return f"signature.{kind}[{index}]"


def _compare_tensor(where: str, declared: TensorSpec, known: TensorSpec, source: str) -> list[str]:
    problems = []
    if declared.datatype != known.datatype:
        problems.append(f"{where}.datatype: {source} says {known.datatype}, serving.yaml says {declared.datatype}")
    fits = len(declared.shape) == len(known.shape) and all(
        k == -1 or d == k for d, k in zip(declared.shape, known.shape, strict=True)
    )
    if not fits:
        says = f"{source} says {format_shape(known.shape)}"
        problems.append(f"{where}.shape: {says}, serving.yaml says {format_shape(declared.shape)}")
    return problems


def _compare_list(kind: str, declared: Sequence[TensorSpec], known: Sequence[TensorSpec], source: str) -> list[str]:
    problems = []
    by_name = {spec.name: spec for spec in known}
    names = ", ".join(repr(spec.name) for spec in known)
    for index, spec in enumerate(declared):
        other = by_name.get(spec.name)
        if other is None:
            problems.append(f"{_field(kind, index)}.name: {source} has no {kind[:-1]} {spec.name!r} (it has: {names})")
        else:
            problems.extend(_compare_tensor(_field(kind, index), spec, other, source))
    return problems


def compare_signatures(declared: Signature, known: Signature, source: str = "the model") -> list[str]:
    """Every disagreement between ``declared`` (serving.yaml) and ``known`` (the model), each naming its field."""
    problems = _compare_list("inputs", declared.inputs, known.inputs, source)
    declared_inputs = {spec.name for spec in declared.inputs}
    for spec in known.inputs:
        if spec.name not in declared_inputs:
            problems.append(
                f"signature.inputs: {source} needs input {spec.name!r} ({spec.datatype} {format_shape(spec.shape)}), "
                "which serving.yaml does not declare"
            )
    # Outputs may be a subset: a model with outputs nobody asks for is served with the declared ones only.
    problems.extend(_compare_list("outputs", declared.outputs, known.outputs, source))
    return problems


def check_signature(declared: Signature, known: Signature | None, source: str = "the model") -> None:
    """Raise ModelLoadError listing every disagreement (nothing to check when ``known`` is None)."""
    if known is None:
        return
    problems = compare_signatures(declared, known, source)
    if problems:
        raise ModelLoadError("; ".join(problems))


def signature_function(kind: str) -> SignatureFn | None:
    """The ``signature_of`` of the module serving ``kind``, or None if that framework cannot infer one."""
    if kind not in INFERRING_KINDS:
        return None
    # Imported here: the registry imports frameworks lazily, and so must this (the manager imports this module).
    from runtimes.base import runtime_class

    module = importlib.import_module(runtime_class(kind).__module__)
    function: SignatureFn | None = getattr(module, "signature_of", None)
    return function


def infer_signature(model_dir: Path, config: ServingConfig) -> Signature | None:
    """The model's own signature (None if its framework does not know it); ModelLoadError if it does not load."""
    function = signature_function(config.runtime)
    return None if function is None else function(model_dir, config)


def verify_signature(model_dir: Path, config: ServingConfig, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Check the declared signature against the model in a child process (blocking; call it off the event loop).

    SignatureMismatch names the field that disagrees; SignatureCheckFailed says why the model could not be read.
    """
    if config.runtime not in INFERRING_KINDS:
        return
    try:
        result = subprocess.run(
            [sys.executable, "-m", "runtimes.signatures", str(model_dir)],
            capture_output=True,
            text=True,
            timeout=timeout,
            # Frameworks start thread pools sized to the machine; loading needs one, and the cores serve traffic.
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise SignatureCheckFailed(
            f"loading the {config.runtime} model to check its signature took longer than {timeout:g} s"
        ) from None
    # Frameworks may print to stdout while loading; the verdict is the last line.
    lines = result.stdout.strip().splitlines()
    message = (lines[-1] if lines else result.stderr.strip()[-2000:]) or f"exit code {result.returncode}"
    if result.returncode == EXIT_MISMATCH:
        raise SignatureMismatch(message)
    if result.returncode != 0:
        raise SignatureCheckFailed(f"the {config.runtime} model does not load: {message}")


def _one_line(message: str) -> str:
    return " ".join(message.split())


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m runtimes.signatures DIR``: exit 0 if the signature fits, else print why (exit 2 or 3)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m runtimes.signatures MODEL_DIR", file=sys.stderr)
        return 64
    model_dir = Path(args[0])
    try:
        config = load_serving_config(model_dir)
        known = infer_signature(model_dir, config)
    except (ModelLoadError, ServingConfigError) as exc:
        print(_one_line(str(exc)))
        return EXIT_LOAD_ERROR
    except Exception as exc:
        print(_one_line(f"{type(exc).__name__}: {exc}"))
        return EXIT_LOAD_ERROR
    problems = [] if known is None else compare_signatures(config.signature, known, source_name(config.runtime))
    if problems:
        print("; ".join(problems))
        return EXIT_MISMATCH
    return 0


_SOURCES = {
    "onnx": "the ONNX graph",
    "sklearn": "the scikit-learn model",
    "xgboost": "the XGBoost model",
    "lightgbm": "the LightGBM model",
    "tensorflow": "the SavedModel",
}


def source_name(kind: str) -> str:
    """How error messages call a ``kind`` model, e.g. "the ONNX graph"."""
    return _SOURCES.get(kind, "the model")


if __name__ == "__main__":
    sys.exit(main())
