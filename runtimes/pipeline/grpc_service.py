"""The Open Inference Protocol over gRPC for a pipeline: the model-level calls address the application."""

from __future__ import annotations

import logging
import time
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2_grpc

from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from runtimes.errors import InferenceError
from runtimes.grpc_codec import (
    build_model_infer_response,
    build_model_metadata_response,
    parse_model_infer_request,
    uses_raw_inputs,
)
from runtimes.grpc_service import HealthReporter
from runtimes.pipeline.executor import STAGES_HEADER
from runtimes.pipeline.service import PipelineService
from runtimes.pipeline.spans import invocation_headers, request_span
from runtimes.rest import EXTENSIONS, SERVER_NAME
from runtimes.spans import describe_request
from tracing.provider import active_tracer

log = logging.getLogger(__name__)


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> NoReturn:
    if isinstance(exc, InferenceError):
        if exc.http_status >= 500:
            log.warning("%s: %s", method, exc)
        await context.abort(grpc.StatusCode[exc.grpc_code], str(exc))
    log.error("%s failed", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
    raise AssertionError("context.abort returned")


class PipelineServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """inference.GRPCInferenceService for one pipeline (ModelConfig and ModelStatistics: UNIMPLEMENTED)."""

    def __init__(self, service: PipelineService, server_version: str) -> None:
        self.service = service
        self.server_version = server_version

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.service.ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.server_version, extensions=EXTENSIONS)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        try:
            self.service.resolve(request.name, request.version)
            return pb.ModelReadyResponse(ready=self.service.ready)
        except Exception as exc:
            await _abort(context, "ModelReady", exc)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        try:
            return build_model_metadata_response(self.service.metadata(request.name, request.version))
        except Exception as exc:
            await _abort(context, "ModelMetadata", exc)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        """Run the pipeline within the caller's deadline; the x-hydro-stages header names who answered."""
        try:
            remaining = context.time_remaining()
            deadline = time.monotonic() + remaining if remaining is not None else None
            tracer = active_tracer()
            if tracer is None:
                infer_request = parse_model_infer_request(request)
                result = await self.service.infer(infer_request, deadline)
            else:
                with request_span(tracer, "grpc", invocation_headers(context), self.service.name) as span:
                    infer_request = parse_model_infer_request(request)
                    describe_request(span, infer_request)
                    result = await self.service.infer(infer_request, deadline)
                    span.set_attribute("hydro.stages", result.stages_header)
            if result.shadows:
                # Shadows start once the RPC is done (answer and status sent), never before the caller's answer.
                context.add_done_callback(lambda _: self.service.send_shadows(result))
            await context.send_initial_metadata(((STAGES_HEADER, result.stages_header),))
            if uses_raw_inputs(request):
                # Raw in, raw out: the last stage's bytes go back as they came.
                message = pb.ModelInferResponse(model_name=self.service.name, id=request.id)
                for tensor in result.outputs:
                    message.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
                    message.raw_output_contents.append(tensor.raw)
                return message
            return build_model_infer_response(self.service.response(result, infer_request), raw=False)
        except Exception as exc:
            await _abort(context, "ModelInfer", exc)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        try:
            self.service.config(request.name, request.version)
        except Exception as exc:
            await _abort(context, "ModelConfig", exc)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        try:
            self.service.statistics(request.name, request.version)
        except Exception as exc:
            await _abort(context, "ModelStatistics", exc)


def create_grpc_server(
    service: PipelineService, *, server_version: str, max_message_bytes: int
) -> tuple[grpc.aio.Server, HealthReporter]:
    """A grpc.aio server with the inference and health services (not yet bound or started)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(PipelineServicer(service, server_version), server)
    reporter = HealthReporter()
    health_pb2_grpc.add_HealthServicer_to_server(reporter.servicer, server)
    return server, reporter
