"""Hand-encoding of DiscoveryResponse around resources that are already serialized.

A snapshot keeps every resource as the bytes of its ``Any``; concatenating those bytes into the response
avoids re-serializing (and copying through protobuf message objects) for every stream. The encoding is the
protobuf wire format of ``envoy.service.discovery.v3.DiscoveryResponse`` fields 1, 2, 4 and 5, and of
``DeltaDiscoveryResponse`` (1, 2, 4, 5, 6) around ``Resource`` (1, 2, 3); tests check both against protobuf's own
parser.
"""

from __future__ import annotations

from collections.abc import Sequence

_VERSION_INFO = 1
_RESOURCES = 2
_TYPE_URL = 4
_NONCE = 5
_REMOVED_RESOURCES = 6
# envoy.service.discovery.v3.Resource
_RESOURCE_VERSION = 1
_RESOURCE_ANY = 2
_RESOURCE_NAME = 3


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(field_number: int, payload: bytes) -> bytes:
    return _varint(field_number << 3 | 2) + _varint(len(payload)) + payload


def encode_discovery_response(version: str, type_url: str, nonce: str, any_resources: Sequence[bytes]) -> bytes:
    """The serialized DiscoveryResponse carrying ``any_resources`` (each the bytes of one Any)."""
    parts = [_length_delimited(_VERSION_INFO, version.encode())]
    parts.extend(_length_delimited(_RESOURCES, resource) for resource in any_resources)
    parts.append(_length_delimited(_TYPE_URL, type_url.encode()))
    parts.append(_length_delimited(_NONCE, nonce.encode()))
    return b"".join(parts)


def encode_delta_resource(name: str, version: str, any_bytes: bytes) -> bytes:
    """The serialized ``Resource`` of a delta response: ``any_bytes`` (one Any) with its name and version."""
    return b"".join(
        (
            _length_delimited(_RESOURCE_VERSION, version.encode()),
            _length_delimited(_RESOURCE_ANY, any_bytes),
            _length_delimited(_RESOURCE_NAME, name.encode()),
        )
    )


def encode_delta_discovery_response(
    system_version: str, type_url: str, nonce: str, delta_resources: Sequence[bytes], removed: Sequence[str]
) -> bytes:
    """The serialized DeltaDiscoveryResponse: ``delta_resources`` (each from encode_delta_resource), ``removed``."""
    parts = [_length_delimited(_VERSION_INFO, system_version.encode())]
    parts.extend(_length_delimited(_RESOURCES, resource) for resource in delta_resources)
    parts.append(_length_delimited(_TYPE_URL, type_url.encode()))
    parts.append(_length_delimited(_NONCE, nonce.encode()))
    parts.extend(_length_delimited(_REMOVED_RESOURCES, name.encode()) for name in removed)
    return b"".join(parts)
