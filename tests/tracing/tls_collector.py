"""A TLS OTLP collector for tests: a CA of the test's own (made with the ``openssl`` command), certificates it
issues, and the in-process OTLP receiver behind TLS with one of them."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from otlp_receiver import OtlpReceiver, _Collector

#: Keys on the P-256 curve: quick to make, and what a collector's certificate commonly is.
_EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _file_stem(name: str) -> str:
    return re.sub(r"\W+", "-", name)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class TestCa:
    """A certificate authority whose certificate and key are files in a test's folder."""

    __test__ = False  # a helper, not a test class for pytest to collect

    certificate: Path
    key: Path

    @classmethod
    def create(cls, folder: Path, name: str = "hydro test CA") -> TestCa:
        """A new self-signed CA (valid two days) named ``name``; its files are named after it in ``folder``."""
        ca = cls(folder / f"{_file_stem(name)}.pem", folder / f"{_file_stem(name)}.key")
        _openssl(
            "req",
            "-x509",
            *_EC_KEY,
            "-keyout",
            str(ca.key),
            "-out",
            str(ca.certificate),
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        )
        return ca

    def issue(self, server_name: str) -> tuple[bytes, bytes]:
        """A server certificate for ``server_name`` (its DNS subject alternative name) and its key, PEM."""
        stem = f"{self.certificate.stem}-{_file_stem(server_name)}"
        folder = self.certificate.parent
        key, request, certificate, extensions = (
            folder / f"{stem}{suffix}" for suffix in (".key", ".csr", ".pem", ".ext")
        )
        _openssl("req", *_EC_KEY, "-keyout", str(key), "-out", str(request), "-subj", f"/CN={server_name}")
        extensions.write_text(f"subjectAltName=DNS:{server_name}\nextendedKeyUsage=serverAuth\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            str(request),
            "-CA",
            str(self.certificate),
            "-CAkey",
            str(self.key),
            "-CAcreateserial",
            "-out",
            str(certificate),
            "-days",
            "2",
            "-extfile",
            str(extensions),
        )
        return certificate.read_bytes(), key.read_bytes()


class TlsOtlpReceiver(OtlpReceiver):
    """The OTLP receiver behind TLS with the given certificate and key."""

    def __init__(self, host: str, certificate: bytes, key: bytes) -> None:
        super().__init__(host)
        self._credentials = grpc.ssl_server_credentials([(key, certificate)])

    def _bind(self, server: grpc.aio.Server, port: int) -> int:
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Collector(self), server)
        return server.add_secure_port(f"{self.host}:{port}", self._credentials)


@contextmanager
def running(receiver: OtlpReceiver) -> Iterator[OtlpReceiver]:
    """``receiver`` started, and stopped on leaving (also on failure)."""
    try:
        yield receiver.start()
    finally:
        receiver.stop()
