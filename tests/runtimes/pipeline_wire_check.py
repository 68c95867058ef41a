"""Checks of the pipeline's stage-answer handling that need protos.inference_pb2, in a process of their own.

Run by test_pipeline_stage_faults.py: protos.inference_pb2 cannot share a process with tritonclient's copy of the
``inference`` package, so this is a plain script (as grpc_decoder_fuzz.py). It prints one JSON object:

- ``sizes``: for every datatype and a few shapes, whether ``response_outputs`` accepts a stage answer of exactly the
  right size (``exact``) and the error it gives with one byte less (``short``) and one byte more (``long``);
- ``bytes_overrun``: the error for a BYTES element longer than the bytes left;
- ``refused_call``: what ``PipelineExecutor.run`` raises when grpc refuses to start a stage call (metadata gRPC
  does not take, added on the way out): the exception's type, status and message.

``python pipeline_wire_check.py SPEC_JSON`` (the spec of the pipeline to run; its stages are never reached).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

from protos import inference_pb2 as pb
from runtimes.errors import InferenceError
from runtimes.pipeline.executor import PipelineExecutor, StageError
from runtimes.pipeline.spec import load_spec
from runtimes.pipeline.wire import WireTensor, response_outputs
from runtimes.tensors import DATATYPES, encode_raw, zeros

SHAPES = ([2, 3], [0], [], [1, 0, 4])


def _answer(datatype: str, shape: list[int], raw: bytes) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name="m", model_version="1")
    response.outputs.add(name="out", datatype=datatype, shape=shape)
    response.raw_output_contents.append(raw)
    return response


def _outcome(datatype: str, shape: list[int], raw: bytes) -> str:
    try:
        response_outputs(_answer(datatype, shape, raw))
    except InferenceError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "accepted"


def sizes() -> dict[str, dict[str, str]]:
    """Each datatype and shape: exact, one byte short and one byte long."""
    found: dict[str, dict[str, str]] = {}
    for datatype in DATATYPES:
        for shape in SHAPES:
            raw = encode_raw(zeros(datatype, shape), datatype)
            found[f"{datatype} {shape}"] = {
                "exact": _outcome(datatype, shape, raw),
                "short": _outcome(datatype, shape, raw[:-1]) if raw else "accepted",
                "long": _outcome(datatype, shape, raw + b"\x00"),
            }
    return found


async def refused_call(spec_path: Path) -> dict[str, Any]:
    """A stage call grpc refuses before sending it: the error the executor turns it into."""
    spec = load_spec(spec_path)
    # Nobody listens there: the call never gets that far.
    executor = PipelineExecutor(spec, "127.0.0.1:1", timeout=5)
    send = executor.call

    async def call_with_bad_metadata(request: pb.ModelInferRequest, **kwargs: Any) -> pb.ModelInferResponse:
        kwargs["metadata"] = (*kwargs["metadata"], ("x-request-id", "caf\u00e9"))
        return await send(request, **kwargs)

    executor.call = call_with_bad_metadata
    raw = np.zeros(3, dtype="<f4").tobytes()
    try:
        await executor.run([WireTensor("x", "FP32", (3,), raw)])
    except StageError as exc:
        return {"type": "StageError", "grpc_code": exc.grpc_code, "http_status": exc.http_status, "message": str(exc)}
    except Exception as exc:
        return {"type": type(exc).__name__, "message": str(exc)}
    finally:
        await executor.close()
    return {"type": "none"}


def main() -> int:
    """Print the findings as one JSON object."""
    overrun = _outcome("BYTES", [1], (10).to_bytes(4, "little") + b"abc")
    print(
        json.dumps(
            {"sizes": sizes(), "bytes_overrun": overrun, "refused_call": asyncio.run(refused_call(Path(sys.argv[1])))}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
