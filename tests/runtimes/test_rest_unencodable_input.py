"""REST requests with values JSON can spell but protobuf cannot carry get a 400 naming the field, from a model
runtime and from the pipeline runtime alike (which used to answer 500 once its stage call failed to encode them).

JSON escapes spell lone surrogates ("\\ud800"), which have no UTF-8 form, and JSON numbers have no size limit;
protobuf strings must be UTF-8 and shape dimensions int64. Both runtimes are real processes on free ports: an echo
model (tests/runtimes/oip_echo.py) and a one-stage pipeline whose stage is never reachable (its outbound port has no
listener), so a request that gets past parsing is answered 503 by the stage call: the 400s come before any stage.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from oip_echo import ROOT, start_echo

from manager_api.ports import free_port
from manager_api.processes import ChildProcess, http_ok

HEADER = "Inference-Header-Content-Length"
INPUT = {"name": "in_fp32", "datatype": "FP32", "shape": [1, 2], "data": [1.5, -2.0]}
#: The echo model's and the pipeline's signature: in_fp32 -> out_fp32, FP32 [-1, 2].
SIGNATURE = {
    "inputs": [{"name": "in_fp32", "datatype": "FP32", "shape": [-1, 2]}],
    "outputs": [{"name": "out_fp32", "datatype": "FP32", "shape": [-1, 2]}],
}


def _body(**fields: Any) -> bytes:
    """A request body; json.dumps writes a lone surrogate as its escape, as a client's JSON library would."""
    return json.dumps({"inputs": [INPUT], **fields}).encode()


def _with_input(**changes: Any) -> bytes:
    return _body(inputs=[{**INPUT, **changes}])


def _binary_with_shape(shape: list[int]) -> tuple[bytes, str]:
    """The binary-data extension: raw bytes pass on to a pipeline's first stage unchecked (it checks their size)."""
    header = json.dumps({"inputs": [{**INPUT, "shape": shape, "data": None, "parameters": {"binary_data_size": 8}}]})
    return header.encode() + b"\0" * 8, str(len(header))


#: name -> (body, Inference-Header-Content-Length or None, what the error says).
CASES: dict[str, tuple[bytes, str | None, str]] = {
    "id": (
        _body(id="\ud800"),
        None,
        "'id' is not valid Unicode text: it holds the lone surrogate \\ud800 at character 0",
    ),
    "id, later character": (_body(id="req-\udc80"), None, "the lone surrogate \\udc80 at character 4"),
    "input name": (_with_input(name="in_\ud800"), None, "inputs[0]: 'name' is not valid Unicode text"),
    "datatype": (_with_input(datatype="FP\udfff"), None, "input 'in_fp32': 'datatype' is not valid Unicode text"),
    "output name": (_body(outputs=[{"name": "out_\ud800"}]), None, "outputs[0]: 'name' is not valid Unicode text"),
    "input parameter": (
        _with_input(parameters={"note": "\ud800"}),
        None,
        "input 'in_fp32': parameter 'note' is not valid Unicode text",
    ),
    "request parameter name": (
        _body(parameters={"\udc80": 1}),
        None,
        "the request: a parameter's name is not valid Unicode text",
    ),
    "output parameter": (
        _body(outputs=[{"name": "out_fp32", "parameters": {"tag": "a\udbff"}}]),
        None,
        "output 'out_fp32': parameter 'tag' is not valid Unicode text",
    ),
    "shape beyond int64": (
        _with_input(shape=[2**64, 2]),
        None,
        "input 'in_fp32': 'shape' has a dimension outside the 64-bit integer range: 18446744073709551616",
    ),
    "shape below int64": (_with_input(shape=[1, -(2**63) - 1]), None, "outside the 64-bit integer range"),
    "raw data, shape beyond int64": (*_binary_with_shape([2**70, 2]), "outside the 64-bit integer range"),
    "a number longer than Python reads": (
        b'{"inputs": [], "id": "x", "priority": ' + b"7" * 5000 + b"}",
        None,
        "the request body cannot be read: Exceeds the limit (4300 digits)",
    ),
}


def _post(base: str, model: str, body: bytes, header_length: str | None = None) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if header_length is not None:
        headers[HEADER] = header_length
    return httpx.post(f"{base}/v2/models/{model}/infer", content=body, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An echo model runtime serving model 'one': its base URL."""
    base = tmp_path_factory.mktemp("unencodable")
    echo = start_echo(base / "one", "one", ("FP32",), base / "logs")
    try:
        echo.process.wait_ready(lambda: http_ok(f"http://{echo.http_url}/v2/health/ready"), 60)
        yield f"http://{echo.http_url}"
    finally:
        echo.process.stop(grace=10)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A pipeline runtime serving application 'shop' (one stage, never reachable): its base URL."""
    base = tmp_path_factory.mktemp("unencodable-pipeline")
    spec = {
        "application": {"name": "shop", "stages": [{"variants": [{"model": "one", "version": 1, "weight": 100}]}]},
        "signatures": {"one:1": SIGNATURE},
    }
    (base / "spec.json").write_text(json.dumps(spec))
    http_port = free_port()
    argv = [sys.executable, "-m", "runtimes.pipeline", "--spec", str(base / "spec.json")]
    argv += ["--outbound", f"127.0.0.1:{free_port()}", "--grpc-port", str(free_port())]
    argv += ["--http-port", str(http_port), "--shutdown-grace", "1"]
    process = ChildProcess("pipeline", argv, cwd=ROOT, log_path=base / "pipeline.log").start()
    try:
        process.wait_ready(lambda: http_ok(f"http://127.0.0.1:{http_port}/v2/health/ready"), 60)
        yield f"http://127.0.0.1:{http_port}"
    finally:
        process.stop(grace=10)


TARGETS: dict[str, tuple[str, str]] = {"runtime": ("runtime", "one"), "pipeline": ("pipeline", "shop")}


@pytest.fixture(params=list(TARGETS))
def target(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(base URL, model name) of the runtime, then of the pipeline runtime."""
    fixture, model = TARGETS[request.param]
    return request.getfixturevalue(fixture), model


@pytest.mark.parametrize("case", list(CASES))
def test_refused_with_400_naming_the_field(target: tuple[str, str], case: str) -> None:
    base, model = target
    body, header_length, fragment = CASES[case]
    response = _post(base, model, body, header_length)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    assert fragment in response.json()["error"], response.text


def test_unicode_beyond_ascii_is_fine(runtime: str, pipeline: str) -> None:
    """Only what has no UTF-8 form is refused: the runtime echoes any other id, the pipeline sends it on (and
    fails at the stage call it cannot make, as any request would)."""
    request_id = "r\u00e9q\u2192\U0001f600"
    body = _body(id=request_id, parameters={"note": "\u00e9"}, outputs=[{"name": "out_fp32"}])
    echoed = _post(runtime, "one", body)
    assert echoed.status_code == 200, echoed.text
    assert echoed.json()["id"] == request_id
    sent_on = _post(pipeline, "shop", body)
    assert sent_on.status_code == 503, sent_on.text
    assert "stage 1 (one:1) of application 'shop' failed: UNAVAILABLE" in sent_on.json()["error"]
    # And the int64 limits themselves pass parsing (the signature then refuses the negative one).
    edge = _post(runtime, "one", _with_input(shape=[2**63 - 1, -(2**63)]))
    assert edge.status_code == 400 and "has shape" in edge.json()["error"], edge.text
