"""gzip and deflate request bodies (Content-Encoding, as tritonclient sends them) against the ``alltypes`` echo
runtime, a real process (conftest.py): whole streams are answered; a stream cut short, or followed by bytes that are
not part of it, is a 400 saying so, never a request read from part of the body (or a 500).

The pipeline runtime reads its bodies with the same function: test_pipeline_stage_faults.py covers it there.
"""

from __future__ import annotations

import gzip
import json
import zlib

import httpx
import pytest
from oip_echo import DATATYPES, EchoRuntime, input_name, sample


def _body() -> bytes:
    inputs = []
    for datatype in DATATYPES:
        values = sample(datatype).reshape(-1)
        listed = [v.decode() for v in values] if datatype == "BYTES" else values.tolist()
        inputs.append({"name": input_name(datatype), "datatype": datatype, "shape": [3, 2], "data": listed})
    return json.dumps({"inputs": inputs}).encode()


BODY = _body()
COMPRESSED = {"gzip": gzip.compress(BODY), "deflate": zlib.compress(BODY)}


def _post(runtime: EchoRuntime, content: bytes, encoding: str) -> httpx.Response:
    url = f"http://{runtime.http_url}/v2/models/alltypes/infer"
    return httpx.post(url, content=content, headers={"content-encoding": encoding}, timeout=30)


@pytest.mark.parametrize("encoding", list(COMPRESSED))
def test_a_whole_stream_is_answered(alltypes: EchoRuntime, encoding: str) -> None:
    response = _post(alltypes, COMPRESSED[encoding], encoding)
    assert response.status_code == 200, response.text
    assert len(response.json()["outputs"]) == len(DATATYPES)


@pytest.mark.parametrize("encoding", list(COMPRESSED))
@pytest.mark.parametrize(
    ("cut", "fragment"),
    [
        # The gzip trailer (CRC and length) or deflate's Adler-32 checksum missing: all the JSON inflates, so only
        # the end of the stream tells the body is incomplete.
        (4, "is cut short: the {encoding} stream ends before its end marker"),
        # Cut inside the compressed data: the JSON would be incomplete too, but the stream is named first.
        (0.5, "is cut short: the {encoding} stream ends before its end marker"),
    ],
    ids=["checksum", "middle"],
)
def test_a_stream_cut_short_is_400(alltypes: EchoRuntime, encoding: str, cut: float, fragment: str) -> None:
    whole = COMPRESSED[encoding]
    keep = len(whole) - int(cut) if cut >= 1 else int(len(whole) * cut)
    response = _post(alltypes, whole[:keep], encoding)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    assert f"the request body {fragment.format(encoding=encoding)}" in response.json()["error"], response.text


@pytest.mark.parametrize("encoding", list(COMPRESSED))
def test_bytes_after_the_stream_are_400(alltypes: EchoRuntime, encoding: str) -> None:
    response = _post(alltypes, COMPRESSED[encoding] + b"garbage", encoding)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert f"the request body has 7 bytes after the end of its {encoding} stream" in error, error
