"""Errors a runtime reports, each knowing its HTTP status and gRPC status code.

The protocol front-ends (rest.py, grpc_service.py) map them; the data plane and codecs only raise them, so the
same mistake gets the same message over both protocols.
"""

from __future__ import annotations


class InferenceError(Exception):
    """A request that cannot be answered; the message is sent to the client as is."""

    http_status = 500
    #: Name of the grpc.StatusCode member, kept as a string so this module needs no gRPC import.
    grpc_code = "INTERNAL"


class InvalidInput(InferenceError):
    """The request is malformed or does not match the model's signature."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class ModelNotFound(InferenceError):
    """The request names a model or version that this runtime does not serve."""

    http_status = 404
    grpc_code = "NOT_FOUND"


class ModelNotReady(InferenceError):
    """The model is still loading, or the runtime is shutting down."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class PredictError(InferenceError):
    """The model itself failed (raised, or returned something the signature does not allow)."""

    http_status = 500
    grpc_code = "INTERNAL"


class PayloadTooLarge(InferenceError):
    """The request body is larger than the configured message limit."""

    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"


class ClientDisconnected(InferenceError):
    """The client went away before its request was read or answered; nobody reads the status, which is for logs
    and spans."""

    http_status = 499  # nginx's "client closed request"
    grpc_code = "CANCELLED"


class NotSupported(InferenceError):
    """A protocol call this server does not offer for what the request names (a pipeline's model configuration)."""

    http_status = 501
    grpc_code = "UNIMPLEMENTED"


class ModelLoadError(RuntimeError):
    """The model folder could not be loaded; the runtime exits with this message."""
