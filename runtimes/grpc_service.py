"""The Open Inference Protocol over gRPC (grpc.aio), plus the standard gRPC health service.

The health service reports SERVING (overall and for ``inference.GRPCInferenceService``) only once the model is
loaded and warmed up, and NOT_SERVING from the moment shutdown begins.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from runtimes.dataplane import APPLICATION_HEADER, DataPlane
from runtimes.errors import InferenceError
from runtimes.grpc_codec import build_model_infer_response, parse_model_infer_request, uses_raw_inputs
from runtimes.rest import EXTENSIONS, SERVER_NAME

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"

_T = TypeVar("_T")


def application_of(context: grpc.aio.ServicerContext) -> str | None:
    """The ``x-hydro-application`` request header, if the mesh set one."""
    for key, value in context.invocation_metadata() or ():
        if key == APPLICATION_HEADER:
            return str(value)
    return None


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService backed by a data plane."""

    def __init__(self, dataplane: DataPlane, server_version: str) -> None:
        self.dataplane = dataplane
        self.server_version = server_version

    async def _guard(self, context: grpc.aio.ServicerContext, method: str, call: Callable[[], Awaitable[_T]]) -> _T:
        try:
            return await call()
        except InferenceError as exc:
            if exc.http_status >= 500:
                log.warning("%s: %s", method, exc)
            await context.abort(grpc.StatusCode[exc.grpc_code], str(exc))
        except Exception as exc:
            # AbortError from the branch above never gets here: it is raised outside this try's handlers.
            log.exception("%s failed", method)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        raise AssertionError("context.abort returned")

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        """Always live while the process serves."""
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        """Ready once the model is loaded and warmed up, until shutdown begins."""
        return pb.ServerReadyResponse(ready=self.dataplane.ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        """Whether the addressed model is ready; NOT_FOUND if it is not served here."""

        async def call() -> pb.ModelReadyResponse:
            ready = self.dataplane.model_ready(request.name, request.version, application_of(context))
            return pb.ModelReadyResponse(ready=ready)

        return await self._guard(context, "ModelReady", call)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        """Server name, version and extensions."""
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.server_version, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        """The model's versions, platform and signature."""

        async def call() -> pb.ModelMetadataResponse:
            meta = self.dataplane.model_metadata(request.name, request.version, application_of(context))
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=meta.name,
                versions=meta.versions,
                platform=meta.platform,
                inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs],
                outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs],
            )

        return await self._guard(context, "ModelMetadata", call)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        """Run one inference."""

        async def call() -> pb.ModelInferResponse:
            response = await self.dataplane.infer(parse_model_infer_request(request), application_of(context))
            return build_model_infer_response(response, raw=uses_raw_inputs(request))

        return await self._guard(context, "ModelInfer", call)


class HealthReporter:
    """The grpc.health.v1 service, switched to SERVING when the data plane becomes ready."""

    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING or NOT_SERVING for the server as a whole and for the inference service."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.servicer.set(service, status)

    async def shutdown(self) -> None:
        """NOT_SERVING for good: later set_serving calls are ignored."""
        await self.servicer.enter_graceful_shutdown()


def create_grpc_server(
    dataplane: DataPlane, *, server_version: str, max_message_bytes: int
) -> tuple[grpc.aio.Server, HealthReporter]:
    """A grpc.aio server with the inference and health services (not yet bound or started)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # Without this, binding a port another process already serves succeeds and the two share traffic.
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(dataplane, server_version), server)
    reporter = HealthReporter()
    health_pb2_grpc.add_HealthServicer_to_server(reporter.servicer, server)
    return server, reporter
