"""A faster OTLP encoding of the spans our processes make, for the exporter's thread.

The SDK's encoder builds every span through a dozen helper calls and intermediate messages: ~28 us per span here,
more than making the span, on a thread that holds the GIL the event loop needs; setting the same fields on the
message one by one still costs ~16 us. Our spans are simple (scalar attributes, no links; events only when an
error is recorded): those are written in protobuf's wire format (names and recurring attributes cached) and
merged into the request with one parse per scope. Any other span goes through the SDK's own encoder, so the
output is always what the SDK would send (tests/tracing/test_encoding.py compares the two).

One bad span never costs the batch (up to 512 spans of other requests): an attribute protobuf cannot carry (an int
outside int64, a string with a lone surrogate, which has no UTF-8 form) is left out, as the SDK's encoder leaves it
out; a span that still cannot be encoded (such a string as its name or status message, which fail the SDK's whole
batch) is left out of the request. Either is logged (quiet_export rate-limits this logger). The checks cost the
usual span nothing: an int's range is checked once per cached value, and a bad string raises where it is encoded.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping, Sequence

from google.protobuf.message import DecodeError
from opentelemetry.exporter.otlp.proto.common._internal import _encode_instrumentation_scope, _encode_resource
from opentelemetry.exporter.otlp.proto.common._internal.trace_encoder import _encode_span
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, Status, StatusCode

from tracing.server_span import RecordingServerSpan

log = logging.getLogger(__name__)

#: SDK SpanKind values are 0-4 (INTERNAL first); OTLP's are 1-5 (0 is UNSPECIFIED).
_KIND_OFFSET = 1
_HAS_IS_REMOTE = trace_pb2.SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_IS_REMOTE = trace_pb2.SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
_STATUS = {StatusCode.UNSET: 0, StatusCode.OK: 1, StatusCode.ERROR: 2}
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def _varint(value: int) -> bytes:
    if 0 <= value < 0x80:
        return _SMALL[value]
    if value < 0:
        value += 1 << 64  # int64 as protobuf writes it: ten bytes of two's complement
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL = [bytes((value,)) for value in range(0x80)]


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag, the payload's length, the payload."""
    size = len(payload)
    return tag + (_SMALL[size] if size < 0x80 else _varint(size)) + payload


# Tags (field number << 3 | wire type) of the OTLP fields written below.
_SPAN_IN_SCOPE = b"\x12"  # ScopeSpans.spans, LEN
_TRACE_ID = b"\x0a\x10"  # Span.trace_id, LEN 16
_SPAN_ID = b"\x12\x08"  # Span.span_id, LEN 8
_PARENT_ID = b"\x22\x08"  # Span.parent_span_id, LEN 8
_NAME = b"\x2a"  # Span.name, LEN
_KIND = b"\x30"  # Span.kind, VARINT
_START = b"\x39"  # Span.start_time_unix_nano, I64
_END = b"\x41"  # Span.end_time_unix_nano, I64
_ATTRIBUTE = b"\x4a"  # Span.attributes, LEN
_STATUS_FIELD = b"\x7a"  # Span.status, LEN
_FLAGS = b"\x85\x01"  # Span.flags (16), I32
_KEY = b"\x0a"  # KeyValue.key, LEN
_VALUE = b"\x12"  # KeyValue.value, LEN
_SCALARS = (str, int, float, bool)
_STRING_VALUE, _BOOL_VALUE, _INT_VALUE, _DOUBLE_VALUE = b"\x0a", b"\x10", b"\x18", b"\x21"  # AnyValue oneof
_STATUS_MESSAGE, _STATUS_CODE = b"\x12", b"\x18"  # Status.message, Status.code
_FLAGS_LOCAL = _FLAGS + struct.pack("<I", _HAS_IS_REMOTE)
_FLAGS_REMOTE_PARENT = _FLAGS + struct.pack("<I", _HAS_IS_REMOTE | _IS_REMOTE)
_PACK_TIME = struct.Struct("<Q").pack
#: An unset status with no message: present, empty (as the SDK sends it).
_STATUS_UNSET = _STATUS_FIELD + b"\x00"
_SERVER_KIND = _KIND + _SMALL[SpanKind.SERVER.value + _KIND_OFFSET]
_PACK_DOUBLE = struct.Struct("<d").pack

#: Encoded names and attributes: the same few (model, version, protocol...) recur on every span.
_cache: dict[tuple[object, ...], bytes] = {}
_CACHE_LIMIT = 4096
#: Longer strings are encoded every time, not cached: what is that long is a request id, unique per span, which
#: would only fill the cache and empty it (forcing everything else to be encoded again) every few thousand spans.
_CACHED_STRING_LENGTH = 32
#: Attribute keys as the start of a KeyValue (the key field and the value field's tag).
_keys: dict[str, bytes] = {}


def _attribute(key: str, value: object) -> bytes:
    # type(), not isinstance: a bool is an int to isinstance.
    kind = type(value)
    if kind is str and len(value) > _CACHED_STRING_LENGTH:  # type: ignore[arg-type]
        prefix = _keys.get(key)
        if prefix is None:
            prefix = _keys[key] = _field(_KEY, key.encode()) + _VALUE
            if len(_keys) >= _CACHE_LIMIT:
                _keys.clear()
        any_value = _field(_STRING_VALUE, value.encode())  # type: ignore[attr-defined]
        return _field(
            _ATTRIBUTE,
            prefix + _SMALL[len(any_value)] + any_value
            if len(any_value) < 0x80
            else prefix + _varint(len(any_value)) + any_value,
        )
    cache_key = (key, kind, value)
    encoded = _cache.get(cache_key)
    if encoded is None:
        if kind is str:
            any_value = _field(_STRING_VALUE, str(value).encode())
        elif kind is bool:
            any_value = _BOOL_VALUE + (b"\x01" if value else b"\x00")
        elif kind is int:
            if not _INT64_MIN <= value <= _INT64_MAX:  # type: ignore[operator]
                # _varint would write a wrong number, or bytes that fail the whole merge.
                raise ValueError(f"int value {value} is outside int64")
            any_value = _INT_VALUE + _varint(int(value))  # type: ignore[call-overload]
        else:
            any_value = _DOUBLE_VALUE + _PACK_DOUBLE(float(value))  # type: ignore[arg-type]
        encoded = _field(_ATTRIBUTE, _field(_KEY, key.encode()) + _field(_VALUE, any_value))
        if len(_cache) >= _CACHE_LIMIT:
            _cache.clear()
        _cache[cache_key] = encoded
    return encoded


def _attributes(span_name: str, attributes: Mapping[str, object]) -> list[bytes]:
    """The span's attributes encoded; one that _attribute cannot encode is left out (logged), as the SDK's encoder
    leaves it out."""
    try:
        return [_attribute(key, value) for key, value in attributes.items()]
    except ValueError:  # UnicodeEncodeError is one; rare, so the good ones are simply encoded again (cached)
        pass
    encoded = []
    for key, value in attributes.items():
        try:
            encoded.append(_attribute(key, value))
        except ValueError as error:  # UnicodeEncodeError is one
            log.warning("tracing: attribute %r of span %r left out of the export: %s", key, span_name, error)
    return encoded


def _name(name: str) -> bytes:
    cache_key = (name,)
    encoded = _cache.get(cache_key)
    if encoded is None:
        encoded = _cache[cache_key] = _field(_NAME, name.encode())
    return encoded


def _status(status: Status) -> bytes:
    if status.status_code is StatusCode.UNSET and not status.description:
        return _STATUS_UNSET
    payload = b""
    if status.description:
        payload += _field(_STATUS_MESSAGE, status.description.encode())
    if status.status_code is not StatusCode.UNSET:
        payload += _STATUS_CODE + _varint(_STATUS[status.status_code])
    # Present even when unset, as the SDK sends it.
    return _field(_STATUS_FIELD, payload)


def _server_span_bytes(span: RecordingServerSpan) -> bytes | None:
    """_span_bytes for the runtime's own server spans, from the integer ids they keep (no SpanContext made)."""
    attributes = span._attributes
    if span._events or not all(type(value) in _SCALARS for value in attributes.values()):
        return None
    parts = [
        _TRACE_ID,
        span.trace_id.to_bytes(16, "big"),
        _SPAN_ID,
        span.span_id.to_bytes(8, "big"),
        _PARENT_ID,
        span.parent_span_id.to_bytes(8, "big"),
        _name(span._name),
        _SERVER_KIND,
        _START,
        _PACK_TIME(span._start_time),
        _END,
        _PACK_TIME(span._end_time or 0),
    ]
    parts += _attributes(span._name, attributes)
    parts += (_status(span._status), _FLAGS_REMOTE_PARENT)
    return _field(_SPAN_IN_SCOPE, b"".join(parts))


def _span_bytes(span: ReadableSpan) -> bytes | None:
    """A simple span as a ScopeSpans.spans field in protobuf's wire format (the upb message setters cost ~16 us
    a span, these byte joins a few); None for a span that is not simple (links, events, dropped attributes, a
    trace state, attribute values that are not scalars)."""
    if type(span) is RecordingServerSpan:
        return _server_span_bytes(span)
    context = span.get_span_context()
    attributes = span.attributes or {}
    if (
        context is None
        or context.trace_state
        or span.links
        or span.events
        or span.dropped_attributes
        or not all(type(value) in _SCALARS for value in attributes.values())
    ):
        return None
    parent = span.parent
    parts = [_TRACE_ID, context.trace_id.to_bytes(16, "big"), _SPAN_ID, context.span_id.to_bytes(8, "big")]
    if parent is not None:
        parts += (_PARENT_ID, parent.span_id.to_bytes(8, "big"))
    parts += (
        _name(span.name),
        _KIND,
        _SMALL[span.kind.value + _KIND_OFFSET],
        _START,
        _PACK_TIME(span.start_time or 0),
        _END,
        _PACK_TIME(span.end_time or 0),
    )
    parts += _attributes(span.name, attributes)
    parts += (_status(span.status), _FLAGS_REMOTE_PARENT if parent is not None and parent.is_remote else _FLAGS_LOCAL)
    return _field(_SPAN_IN_SCOPE, b"".join(parts))


def encode_spans(spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
    """The export request for ``spans``, grouped by resource and instrumentation scope as the SDK groups them."""
    request = ExportTraceServiceRequest()
    resources: dict[int, trace_pb2.ResourceSpans] = {}
    scopes: dict[tuple[int, int], trace_pb2.ScopeSpans] = {}
    #: Simple spans of each scope written but not yet merged (merged before an unusual span, to keep the order).
    pending: dict[tuple[int, int], list[bytes]] = {}
    for span in spans:
        try:
            # Written (never empty) if the span is simple, else the SDK's message.
            encoded = _span_bytes(span) or _encode_span(span)
        except Exception as error:
            # A name or status message with a lone surrogate, so far; whatever it is, it costs this span only.
            log.warning("tracing: span %r left out of the export: %s: %s", span.name, type(error).__name__, error)
            continue
        resource, scope = span.resource, span.instrumentation_scope
        key = (id(resource), id(scope))
        scope_spans = scopes.get(key)
        if scope_spans is None:
            resource_spans = resources.get(id(resource))
            if resource_spans is None:
                resource_spans = request.resource_spans.add(schema_url=resource.schema_url)
                resource_spans.resource.CopyFrom(_encode_resource(resource))
                resources[id(resource)] = resource_spans
            scope_spans = resource_spans.scope_spans.add(schema_url=scope.schema_url if scope else None)
            if scope is not None:
                scope_spans.scope.CopyFrom(_encode_instrumentation_scope(scope))
            scopes[key] = scope_spans
        if isinstance(encoded, bytes):
            pending.setdefault(key, []).append(encoded)
        else:
            _merge(scope_spans, pending.pop(key, None))
            scope_spans.spans.append(encoded)
    for key, written in pending.items():
        _merge(scopes[key], written)
    return request


def _merge(scope_spans: trace_pb2.ScopeSpans, encoded: list[bytes] | None) -> None:
    """Append spans written by _span_bytes: one parse of their concatenation appends them all, in order."""
    if not encoded:
        return
    merged = len(scope_spans.spans)
    try:
        scope_spans.MergeFromString(b"".join(encoded))
    except DecodeError:
        # Only a mistake of the writer above gets here; it should cost the span it wrote, not the whole scope.
        del scope_spans.spans[merged:]
        for written in encoded:
            one = trace_pb2.ScopeSpans()
            try:
                one.MergeFromString(written)
            except DecodeError as error:
                log.warning("tracing: a span written unparseable was left out of the export: %s", error)
            else:
                scope_spans.spans.extend(one.spans)


class FastOTLPSpanExporter(OTLPSpanExporter):
    """The SDK's OTLP gRPC span exporter with the encoding above."""

    def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
        return encode_spans(data)
