"""A REST client that goes away in the middle of sending its body is logged as that, at info, by the ``alltypes``
echo runtime (a real process, conftest.py): not as an ERROR with a traceback (Starlette's ClientDisconnect used
to reach the catch-all handler, a "failed" 500 for every aborted upload), and the runtime serves on.

The pipeline runtime reads its bodies with the same function: test_pipeline_stage_faults.py covers it there.
"""

from __future__ import annotations

import socket

import httpx
import pytest
from oip_echo import EchoRuntime

from manager_api.processes import wait_until


@pytest.mark.parametrize("path", ["/v2/models/alltypes/infer", "/v2/models/alltypes/versions/1/infer"])
def test_a_body_cut_off_by_the_client_is_logged_as_a_disconnect(alltypes: EchoRuntime, path: str) -> None:
    marker = f"POST {path}: the client disconnected before sending its whole body"
    start = len(alltypes.log())  # the log is the session's: only what this test adds is looked at
    with socket.create_connection(("127.0.0.1", alltypes.http_port), timeout=10) as client:
        # The head and one byte of the 1000 announced; the server reads them before it sees the close.
        client.sendall(f"POST {path} HTTP/1.1\r\nHost: runtime\r\nContent-Length: 1000\r\n\r\n".encode() + b"{")
    wait_until(lambda: marker in alltypes.log()[start:], 10, "the disconnect logged")
    log = alltypes.log()[start:]
    assert "ClientDisconnect" not in log and " failed" not in log, log[-3000:]
    assert httpx.get(f"http://{alltypes.http_url}/v2/health/ready", timeout=10).status_code == 200
