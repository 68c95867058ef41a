"""benchmarks/h2load.py against a real gRPC server and the real h2load.

The server answers like the pipeline runtime: response headers first, then (here 1.5 s later) the message and the
trailers. The first call of a timed run starts in h2load's one-second warm-up and ends after it, so h2load logs it
with status 0; it succeeded, and the benchmark must not count it as an error.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import wrappers_pb2

# benchmarks/ is not an installed package: the benchmarks themselves run from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.h2load import failed_requests, grpc_frame, run_h2load

HEADERS_AHEAD_S = 1.5

pytestmark = pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load is not installed (make bench-deps)")


def _headers_then_answer(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.send_initial_metadata((("x-hydro-stages", "a"),))
    time.sleep(HEADERS_AHEAD_S)
    # The server neither parses the request nor needs a real ModelInferResponse: h2load only reads the frames.
    return wrappers_pb2.StringValue(value="slow").SerializeToString()


@pytest.fixture
def slow_server() -> Iterator[str]:
    """A gRPC server on a free loopback port whose ModelInfer sends its headers 1.5 s before its answer."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler: Any = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService",
        {"ModelInfer": grpc.unary_unary_rpc_method_handler(_headers_then_answer)},
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_a_call_whose_headers_came_during_the_warm_up_is_no_error(
    slow_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frame = tmp_path / "request.grpc"
    frame.write_bytes(grpc_frame(wrappers_pb2.StringValue(value="request")))

    # One connection: calls end at ~1.5 s (headers in the warm-up, logged as status 0) and ~3 s (status 200).
    result = run_h2load(slow_server, frame, 1, 3.0)

    assert result["errors"] == 0
    # ... although h2load's log had the status-0 line (so the case did happen).
    assert "statuses in the log {0: 1}" in capsys.readouterr().err
    assert result["p50_ms"] >= HEADERS_AHEAD_S * 1000


def test_the_failed_count_is_h2loads_summary() -> None:
    output = (
        "finished in 4.00s, 375.25 req/s, 60.04KB/s\n"
        "requests: 1504 total, 1504 started, 1504 done, 1501 succeeded, 3 failed, 2 errored, 0 timeout\n"
        "status codes: 1502 2xx, 0 3xx, 0 4xx, 0 5xx\n"
    )
    assert failed_requests(output) == 3
    with pytest.raises(RuntimeError, match="no request summary"):
        failed_requests("finished in 4.00s\n")
