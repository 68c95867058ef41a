"""The shadow worker on its own: its frames, and the process as the pipeline runtime drives it over a socket pair.

The whole path (runtime -> worker -> sidecar -> shadow runtimes, metrics back) runs in test_pipeline.py; here the
worker's outbound address is a port nobody listens on, so every shadow call it makes fails as UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from manager_api.ports import free_port
from runtimes.pipeline.shadow_frames import (
    FrameError,
    ShadowJob,
    ShadowReport,
    decode_job,
    decode_reports,
    encode_job,
    encode_reports,
    read_frame,
)

JOB = ShadowJob(
    stage=2,
    shadows=("back:2", "back:3"),
    headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "x-request-id": "r1"},
    # Empty protobuf messages (this module cannot import protos.inference_pb2 beside tritonclient's service_pb2).
    request=b"",
    primary=b"",
)


def _body(frame: bytes) -> bytes:
    (size,) = struct.unpack("!I", frame[:4])
    assert size == len(frame) - 4
    return frame[4:]


def test_a_job_and_a_report_batch_come_back_as_they_were_sent() -> None:
    assert decode_job(_body(encode_job(JOB))) == JOB
    reports = [ShadowReport(2, "back:2", "error", 0.004), ShadowReport(2, "back:3", "agree", 2.01)]
    assert decode_reports(_body(encode_reports(reports))) == reports


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (_body(encode_job(JOB))[:-3], "runs past the frame"),
        (_body(encode_job(JOB)) + b"\x00\x00", "length is cut off"),
        (_body(encode_job(ShadowJob(1, (), {}, b"", b""))), "at least 5 expected"),
        (_body(encode_job(ShadowJob(1, ("a:1",), {"traceparent": 1}, b"", b""))), "not a JSON object of strings"),  # type: ignore[dict-item]
        (b"".join(struct.pack("!I", len(f)) + f for f in (b"2", b"[" * 100_000, b"", b"", b"a:1")), "unreadable job"),
    ],
)
def test_a_broken_job_is_refused_naming_what_is_wrong(body: bytes, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        decode_job(body)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[[2, 'back:2']]", "unreadable report batch"),
        (json.dumps([[2, "back:2", "maybe", 0.1]]).encode(), "unknown shadow outcome"),
        (json.dumps([[2, "back:2"]]).encode(), "unreadable report batch"),
        (b"[" * 100_000, "unreadable report batch"),  # nested past Python's recursion limit
        (json.dumps({"2": "back:2"}).encode(), "a list of reports expected"),
        (b'[[2, "back:2", "agree", NaN]]', "not a finite number"),
        (b'[[2, "back:2", "agree", 1e999]]', "not a finite number"),
        (json.dumps([[2, "back:2", "agree", -1.0]]).encode(), "not a finite number"),
    ],
)
def test_a_broken_report_batch_is_refused_naming_what_is_wrong(body: bytes, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        decode_reports(body)


def test_a_frame_over_the_limit_or_cut_off_is_refused() -> None:
    async def read(data: bytes, limit: int) -> bytes | None:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await read_frame(reader, limit)

    assert asyncio.run(read(b"", 100)) is None
    assert asyncio.run(read(struct.pack("!I", 3) + b"abc", 100)) == b"abc"
    with pytest.raises(FrameError, match="over the 100-byte limit"):
        asyncio.run(read(struct.pack("!I", 101) + b"x" * 101, 100))
    with pytest.raises(FrameError, match="inside a frame of 3 bytes"):
        asyncio.run(read(struct.pack("!I", 3) + b"ab", 100))
    with pytest.raises(FrameError, match="inside a frame's length"):
        asyncio.run(read(b"\x00\x00", 100))


class Worker:
    """A shadow worker process with the test holding the other end of its stdin socket."""

    def __init__(self, *args: str, outbound: str | None = None) -> None:
        self.socket, theirs = socket.socketpair()
        argv = [sys.executable, "-m", "runtimes.pipeline.shadow_worker", "--app", "app"]
        argv += ["--outbound", outbound or f"127.0.0.1:{free_port()}", "--timeout", "2", *args]
        self.process = subprocess.Popen(argv, stdin=theirs, stderr=subprocess.PIPE, text=True)
        theirs.close()
        self.socket.settimeout(30)
        self.stream = self.socket.makefile("rb")

    def reports(self, count: int) -> list[ShadowReport]:
        """Read report batches until ``count`` reports came."""
        reports: list[ShadowReport] = []
        while len(reports) < count:
            header = self.stream.read(4)
            assert len(header) == 4, f"the worker ended its reports after {len(reports)} of {count}"
            (size,) = struct.unpack("!I", header)
            reports += decode_reports(self.stream.read(size))
        return reports

    def exit_code(self) -> tuple[int, str]:
        _, stderr = self.process.communicate(timeout=30)
        return self.process.returncode, stderr

    def stop(self) -> None:
        self.stream.close()
        self.socket.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate(timeout=30)


@pytest.fixture
def worker() -> Iterator[Worker]:
    started = Worker()
    try:
        yield started
    finally:
        started.stop()


def test_each_shadow_of_a_job_is_reported_and_the_end_of_stdin_ends_the_worker(worker: Worker) -> None:
    started = time.monotonic()
    worker.socket.sendall(encode_job(JOB))
    reports = worker.reports(2)
    # Nobody listens on the outbound port: both calls fail, neither reaches anyone.
    assert sorted((r.stage, r.shadow, r.outcome) for r in reports) == [(2, "back:2", "error"), (2, "back:3", "error")]
    assert all(0 <= r.latency < time.monotonic() - started for r in reports)
    worker.socket.shutdown(socket.SHUT_WR)
    code, _ = worker.exit_code()
    assert code == 0


def test_an_unreadable_request_or_primary_is_reported_as_an_error_not_lost(worker: Worker) -> None:
    worker.socket.sendall(encode_job(ShadowJob(1, ("a:1",), {}, b"\xff\xff", b"")))
    worker.socket.sendall(encode_job(ShadowJob(1, ("a:2",), {}, b"", b"\xff\xff")))
    reports = worker.reports(2)
    assert sorted((r.shadow, r.outcome) for r in reports) == [("a:1", "error"), ("a:2", "error")]
    # Neither ended the worker: it still answers.
    worker.socket.sendall(encode_job(JOB))
    assert len(worker.reports(2)) == 2


def test_a_bad_frame_ends_the_worker_with_an_error_naming_it(worker: Worker) -> None:
    worker.socket.sendall(struct.pack("!I", 5) + b"\x00\x00\x00\x09x")
    code, stderr = worker.exit_code()
    assert code == 1
    assert "bad frame from the pipeline runtime: a job field of 9 bytes runs past the frame's 5 bytes" in stderr


def test_copies_cancelled_as_the_worker_stops_are_reported_as_dropped_not_as_errors() -> None:
    # An outbound listener that takes the connection and never answers: the calls stay in flight.
    silent = socket.create_server(("127.0.0.1", 0))
    silent.settimeout(30)
    worker = Worker("--timeout", "60", outbound=f"127.0.0.1:{silent.getsockname()[1]}")
    try:
        worker.socket.sendall(encode_job(JOB))
        connection, _ = silent.accept()  # the worker's channel connects for its first call
        # A bad frame ends the worker while both copies wait for an answer.
        worker.socket.sendall(struct.pack("!I", 5) + b"\x00\x00\x00\x09x")
        reports = worker.reports(2)
        assert sorted((r.shadow, r.outcome, r.latency) for r in reports) == [
            ("back:2", "dropped", 0.0),
            ("back:3", "dropped", 0.0),
        ]
        code, _ = worker.exit_code()
        assert code == 1
        connection.close()
    finally:
        worker.stop()
        silent.close()


def test_the_worker_refuses_a_stdin_that_is_not_a_socket() -> None:
    argv = [sys.executable, "-m", "runtimes.pipeline.shadow_worker", "--app", "a", "--outbound", "127.0.0.1:1"]
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "stdin must be a socket from the pipeline runtime" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--outbound", "127.0.0.1:1"], "the following arguments are required: --app"),
        (["--app", "a", "--outbound", "127.0.0.1:1", "--timeout", "0"], "--timeout must be positive"),
    ],
)
def test_bad_worker_arguments_are_refused_naming_them(args: list[str], message: str) -> None:
    argv = [sys.executable, "-m", "runtimes.pipeline.shadow_worker", *args]
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr


def test_the_pipeline_runtime_refuses_a_bad_shadow_delay(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "runtimes.pipeline", "--spec", str(tmp_path / "spec.json")]
    argv += ["--outbound", "127.0.0.1:1", "--grpc-port", "1", "--http-port", "2", "--shadow-delay", "-1"]
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--shadow-delay must be between 0 and 10 seconds" in done.stderr
