"""Pieces of Envoy's core API (envoy.config.core.v3) and the durations that clusters, listeners and routes share."""

from __future__ import annotations

from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, substitution_format_string_pb2
from google.protobuf import duration_pb2


def ads_source() -> config_source_pb2.ConfigSource:
    """A config source that says: over the ADS stream this Envoy already has (xDS v3)."""
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
    )


def seconds(value: float) -> duration_pb2.Duration:
    """A duration of ``value`` seconds (to the nanosecond)."""
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


def milliseconds(value: int) -> duration_pb2.Duration:
    """A duration of ``value`` milliseconds (the unit of the deployment policies)."""
    duration = duration_pb2.Duration()
    duration.FromMilliseconds(value)
    return duration


def socket_address(host: str, port: int) -> address_pb2.Address:
    """A TCP address."""
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port))


def set_header(name: str, value: str) -> base_pb2.HeaderValueOption:
    """A header to add, replacing any the request or response already has."""
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def text_format(format_string: str) -> substitution_format_string_pb2.SubstitutionFormatString:
    """A plain-text body from a substitution format string (%REQ(...)%, %DYNAMIC_METADATA(...)%...)."""
    return substitution_format_string_pb2.SubstitutionFormatString(
        text_format_source=base_pb2.DataSource(inline_string=format_string)
    )
