"""The frames between the pipeline runtime and its shadow worker, over one socket pair (the worker's stdin).

Every frame is a 4-byte big-endian length and that many bytes. The runtime sends jobs: one stage request to copy
to that stage's shadows, as the stage's serialized ModelInferRequest (the bytes the primary was sent), the primary's
outputs as a serialized ModelInferResponse, the stage's index, the shadow versions and the headers that put the
shadow calls in the request's trace. A job body is a sequence of fields, each a 4-byte length and its bytes, so
tensors are never re-encoded. The worker answers with batches of outcome reports, a small JSON list each.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

_LENGTH = struct.Struct("!I")
#: Fields of a job before its shadows: stage, trace headers (JSON), request bytes, primary outputs bytes.
_JOB_FIXED_FIELDS = 4
#: How a shadow call that was made ends (the runtime counts each in hydro_shadow_calls_total).
CALL_OUTCOMES = frozenset({"agree", "disagree", "error"})
#: A copy the worker gave up before it had an outcome (cancelled as the worker stopped): counted as dropped, with
#: no latency, like the copies a worker that died never reported.
DROPPED = "dropped"
#: The outcomes a report may carry; anything else in a frame is a protocol error.
OUTCOMES = CALL_OUTCOMES | {DROPPED}


class FrameError(ValueError):
    """A frame that does not decode: the peer speaks something else, or a bug; the connection is given up."""


@dataclass(frozen=True, slots=True)
class ShadowJob:
    """One stage request to copy to each of ``shadows`` ("model:version")."""

    stage: int
    shadows: tuple[str, ...]
    #: W3C trace context and x-request-id of the caller's request (empty when it is not traced).
    headers: Mapping[str, str]
    #: The stage's ModelInferRequest, serialized.
    request: bytes
    #: The primary's outputs as a ModelInferResponse, serialized.
    primary: bytes


@dataclass(frozen=True, slots=True)
class ShadowReport:
    """How one shadow call ended: agree, disagree or error, after ``latency`` seconds."""

    stage: int
    shadow: str
    outcome: str
    latency: float


def _frame(body: bytes) -> bytes:
    return _LENGTH.pack(len(body)) + body


def encode_job(job: ShadowJob) -> bytes:
    """A job as one frame."""
    fields = [
        str(job.stage).encode(),
        json.dumps(dict(job.headers)).encode(),
        job.request,
        job.primary,
        *(shadow.encode() for shadow in job.shadows),
    ]
    parts = [_LENGTH.pack(sum(4 + len(field) for field in fields))]
    for field in fields:
        parts += (_LENGTH.pack(len(field)), field)
    return b"".join(parts)


def decode_job(body: bytes) -> ShadowJob:
    """The job in a frame's body; FrameError if it is not one."""
    view = memoryview(body)
    fields: list[bytes] = []
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise FrameError(f"a job field's length is cut off at byte {offset} of {len(view)}")
        (size,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + size > len(view):
            raise FrameError(f"a job field of {size} bytes runs past the frame's {len(view)} bytes")
        fields.append(bytes(view[offset : offset + size]))
        offset += size
    if len(fields) <= _JOB_FIXED_FIELDS:
        raise FrameError(f"a job has {len(fields)} fields; at least {_JOB_FIXED_FIELDS + 1} expected")
    stage, headers, request, primary, *shadows = fields
    try:
        stage_index = int(stage)
        parsed = json.loads(headers)
        names = tuple(shadow.decode() for shadow in shadows)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise FrameError(f"an unreadable job: {exc}") from None
    if not isinstance(parsed, dict) or not all(isinstance(v, str) for v in parsed.values()):
        raise FrameError("a job's trace headers are not a JSON object of strings")
    return ShadowJob(stage_index, names, parsed, request, primary)


def encode_reports(reports: Sequence[ShadowReport]) -> bytes:
    """A batch of reports as one frame."""
    return _frame(json.dumps([[r.stage, r.shadow, r.outcome, r.latency] for r in reports]).encode())


def decode_reports(body: bytes) -> list[ShadowReport]:
    """The reports in a frame's body; FrameError if it is not a batch of them."""
    try:
        rows = json.loads(body)
        if not isinstance(rows, list):
            raise TypeError(f"a list of reports expected, got {type(rows).__name__}")
        reports = [
            ShadowReport(int(stage), str(shadow), str(outcome), float(latency))
            for stage, shadow, outcome, latency in rows
        ]
    except (ValueError, TypeError, RecursionError) as exc:  # RecursionError: JSON nested beyond Python's stack
        raise FrameError(f"an unreadable report batch: {exc}") from None
    if not all(math.isfinite(r.latency) and r.latency >= 0 for r in reports):
        raise FrameError("a shadow latency that is not a finite number of seconds >= 0")
    unknown = {r.outcome for r in reports} - OUTCOMES
    if unknown:
        raise FrameError(f"unknown shadow outcome {sorted(unknown)}")
    return reports


async def read_frame(reader: asyncio.StreamReader, limit: int) -> bytes | None:
    """The next frame's body, or None at the end of the stream; FrameError beyond ``limit`` bytes or cut off."""
    try:
        header = await reader.readexactly(4)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise FrameError("the stream ended inside a frame's length") from None
        return None
    (size,) = _LENGTH.unpack(header)
    if size > limit:
        raise FrameError(f"a frame of {size} bytes is over the {limit}-byte limit")
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise FrameError(f"the stream ended inside a frame of {size} bytes") from None
