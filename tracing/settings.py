"""Tracing settings from the standard OpenTelemetry environment variables.

Only what decides whether and where spans go is read here; the sampler (``OTEL_TRACES_SAMPLER`` and
``OTEL_TRACES_SAMPLER_ARG``), batch sizes (``OTEL_BSP_*``), headers and timeouts (``OTEL_EXPORTER_OTLP_*``) are
read by the SDK itself, so every standard variable keeps its standard meaning.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
INSECURE_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "OTEL_EXPORTER_OTLP_INSECURE")
#: The CA bundle (PEM) a TLS collector's certificate is checked against, when not the system's.
CERTIFICATE_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "OTEL_EXPORTER_OTLP_CERTIFICATE")
#: The OTLP gRPC port, when an endpoint names none.
DEFAULT_OTLP_GRPC_PORT = 4317
#: Debian's (and the compose image's) bundle of the system's trusted CAs. A TLS collector's certificate is checked
#: against it when no CA file is named: gRPC's Python client would otherwise use the roots bundled with grpcio,
#: and Envoy finds none by itself, so naming this one file makes the Envoys, the probe and the exporters agree.
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


class InvalidEndpoint(ValueError):
    """An OTLP endpoint that is neither ``HOST:PORT`` nor ``http(s)://HOST[:PORT]``, or a CA file that is not
    there."""


@dataclass(frozen=True)
class CollectorAddress:
    """Where an OTLP gRPC collector listens."""

    host: str
    port: int
    secure: bool = False
    #: PEM file of the CAs a TLS collector's certificate is checked against; None: the system's.
    ca_file: str | None = None

    @property
    def target(self) -> str:
        """``HOST:PORT`` as gRPC takes it: an IPv6 address in brackets (``[::1]:4317``), else its colons would be
        read as the port separator."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The endpoint as the OTLP exporter takes it (the scheme says whether TLS is used)."""
        return f"{'https' if self.secure else 'http'}://{self.target}"

    def __str__(self) -> str:
        return self.target


def parse_endpoint(endpoint: str, *, insecure: bool | None = None) -> CollectorAddress:
    """``HOST:PORT``, ``HOST`` or ``http(s)://HOST[:PORT]`` as a collector address.

    Without a scheme the connection is plain text unless ``insecure`` is False: a collector next to the mesh
    (Jaeger's all-in-one, a local OpenTelemetry collector) speaks plain gRPC, and the SDK's own default for a
    scheme-less endpoint (TLS) fails against it with nothing but export errors in the log.
    """
    text = endpoint.strip()
    if not text:
        raise InvalidEndpoint("the OTLP endpoint is empty")
    has_scheme = "://" in text
    parts = urlsplit(text if has_scheme else f"//{text}")
    if has_scheme and parts.scheme not in ("http", "https", "grpc"):
        raise InvalidEndpoint(f"OTLP endpoint {endpoint!r}: the scheme must be http or https, not {parts.scheme!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise InvalidEndpoint(f"OTLP endpoint {endpoint!r}: {exc}") from None
    host = parts.hostname
    if not host:
        raise InvalidEndpoint(f"OTLP endpoint {endpoint!r} names no host (expected HOST:PORT)")
    if parts.path not in ("", "/"):
        raise InvalidEndpoint(f"OTLP endpoint {endpoint!r}: OTLP over gRPC takes no path")
    secure = parts.scheme == "https" if has_scheme else insecure is False
    return CollectorAddress(host, port or DEFAULT_OTLP_GRPC_PORT, secure)


def _ca_file_from_environ(environ: Mapping[str, str]) -> str | None:
    """``OTEL_EXPORTER_OTLP_(TRACES_)CERTIFICATE``, checked to be a file: a missing one is said at start-up
    rather than as a collector that never answers."""
    path = next((environ[name].strip() for name in CERTIFICATE_VARIABLES if environ.get(name, "").strip()), None)
    if path is None:
        return None
    if not os.path.isfile(path):
        raise InvalidEndpoint(f"the collector's CA file {path!r} (OTEL_EXPORTER_OTLP_CERTIFICATE) does not exist")
    # Absolute: the Envoys read it too, from their own working directory.
    return os.path.abspath(path)


def with_ca_file(collector: CollectorAddress, environ: Mapping[str, str]) -> CollectorAddress:
    """``collector`` with the CA file of ``environ`` when it speaks TLS; a plain-text collector ignores the
    variable (it may be set for other exporters, and name a file that is not here)."""
    return replace(collector, ca_file=_ca_file_from_environ(environ)) if collector.secure else collector


def trusted_ca_file(collector: CollectorAddress) -> str | None:
    """The CA file a TLS collector's certificate is checked against: the one named, else the system bundle where
    it exists, else None (gRPC's own roots)."""
    if collector.ca_file is not None:
        return collector.ca_file
    return SYSTEM_CA_BUNDLE if os.path.isfile(SYSTEM_CA_BUNDLE) else None


def _flag(value: str | None) -> bool | None:
    if value is None or not value.strip():
        return None
    return value.strip().lower() == "true"


@dataclass(frozen=True)
class TracingSettings:
    """Whether this process traces, and to which collector."""

    collector: CollectorAddress | None = None
    #: ``OTEL_SERVICE_NAME``: overrides the name the process gives itself.
    service_name: str | None = None

    @property
    def enabled(self) -> bool:
        """Tracing is on only with a collector to send to."""
        return self.collector is not None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> TracingSettings:
        """Settings from ``environ`` (default: this process's environment).

        Off when ``OTEL_SDK_DISABLED`` is true, when ``OTEL_TRACES_EXPORTER`` is ``none``, or when no endpoint is
        set: without a collector there is nobody to send spans to, so none are made.
        """
        env = os.environ if environ is None else environ
        service_name = env.get("OTEL_SERVICE_NAME", "").strip() or None
        if _flag(env.get("OTEL_SDK_DISABLED")) or env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
            return cls(None, service_name)
        endpoint = next((env[name] for name in ENDPOINT_VARIABLES if env.get(name, "").strip()), None)
        if endpoint is None:
            return cls(None, service_name)
        insecure = next((_flag(env.get(name)) for name in INSECURE_VARIABLES if _flag(env.get(name)) is not None), None)
        collector = with_ca_file(parse_endpoint(endpoint, insecure=insecure), env)
        return cls(collector, service_name)
