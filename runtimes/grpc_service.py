"""The Open Inference Protocol over gRPC (grpc.aio), plus the standard gRPC health service.

The health service reports SERVING (overall and for ``inference.GRPCInferenceService``) only once the model is
loaded and warmed up, and NOT_SERVING from the moment shutdown begins.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.trace import Tracer

from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from runtimes.dataplane import APPLICATION_HEADER, DataPlane
from runtimes.errors import InferenceError
from runtimes.grpc_codec import (
    build_model_infer_response,
    build_model_metadata_response,
    parse_model_infer_request,
    uses_raw_inputs,
)
from runtimes.json_codec import CONFIG_DATATYPES
from runtimes.rest import EXTENSIONS, SERVER_NAME
from runtimes.spans import describe_request, inference_span
from runtimes.statistics import BATCH_STAGES, INFER_STAGES, Duration
from tracing.provider import active_tracer

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"


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

    async def _abort(self, context: grpc.aio.ServicerContext, method: str, exc: Exception) -> NoReturn:
        """End the call with the status the error maps to (INTERNAL, logged with its traceback, if unexpected)."""
        if isinstance(exc, InferenceError):
            if exc.http_status >= 500:
                log.warning("%s: %s", method, exc)
            await context.abort(grpc.StatusCode[exc.grpc_code], str(exc))
        log.error("%s failed", method, exc_info=exc)
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
        try:
            ready = self.dataplane.model_ready(request.name, request.version, application_of(context))
            return pb.ModelReadyResponse(ready=ready)
        except Exception as exc:
            await self._abort(context, "ModelReady", exc)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        """Server name, version and extensions."""
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.server_version, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        """The model's versions, platform and signature."""
        try:
            return build_model_metadata_response(
                self.dataplane.model_metadata(request.name, request.version, application_of(context))
            )
        except Exception as exc:
            await self._abort(context, "ModelMetadata", exc)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        """Run one inference."""
        tracer = active_tracer()
        try:
            if tracer is None:
                # The application header only matters to a request that does not name this model (see
                # DataPlane.resolve); reading the metadata costs every other request a few microseconds.
                application = None if request.model_name == self.dataplane.name else application_of(context)
                response = await self.dataplane.infer(parse_model_infer_request(request), application)
                return build_model_infer_response(response, raw=uses_raw_inputs(request))
            return await self._traced_infer(tracer, request, context)
        except Exception as exc:
            await self._abort(context, "ModelInfer", exc)

    async def _traced_infer(
        self, tracer: Tracer, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        metadata = {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}
        app_name = metadata.get(APPLICATION_HEADER)
        with inference_span(tracer, "grpc", metadata, request.model_name, request.model_version, app_name) as span:
            infer_request = parse_model_infer_request(request)
            describe_request(span, infer_request)
            response = await self.dataplane.infer(infer_request, app_name)
            return build_model_infer_response(response, raw=uses_raw_inputs(request))

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        """The model's configuration in Triton's terms (a subset of Triton's ModelConfig)."""
        try:
            meta = self.dataplane.model_metadata(request.name, request.version, application_of(context))
            config = pb.ModelConfig(name=meta.name, platform=meta.platform, backend=meta.platform, max_batch_size=0)
            for t in meta.inputs:
                config.input.add(name=t.name, data_type=pb.DataType.Value(CONFIG_DATATYPES[t.datatype]), dims=t.shape)
            for t in meta.outputs:
                config.output.add(name=t.name, data_type=pb.DataType.Value(CONFIG_DATATYPES[t.datatype]), dims=t.shape)
            return pb.ModelConfigResponse(config=config)
        except Exception as exc:
            await self._abort(context, "ModelConfig", exc)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        """Cumulative inference statistics; an empty name means every model served here (this one)."""
        try:
            snapshot = self.dataplane.model_statistics(request.name, request.version, application_of(context))

            def duration(d: Duration) -> pb.StatisticDuration:
                return pb.StatisticDuration(count=d.count, ns=d.ns)

            stats = pb.ModelStatistics(
                name=self.dataplane.name,
                version=self.dataplane.version_string,
                last_inference=snapshot.last_inference_ms,
                inference_count=snapshot.inference_count,
                execution_count=snapshot.execution_count,
                inference_stats=pb.InferStatistics(**{k: duration(snapshot.stages[k]) for k in INFER_STAGES}),
            )
            for size, stages in snapshot.batches.items():
                stats.batch_stats.add(batch_size=size, **{k: duration(stages[k]) for k in BATCH_STAGES})
            return pb.ModelStatisticsResponse(model_stats=[stats])
        except Exception as exc:
            await self._abort(context, "ModelStatistics", exc)


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


class _Malformed:
    """A request body that is not a valid message of the method's request type."""

    def __init__(self, type_name: str, error: str) -> None:
        self.message = f"the request is not a valid {type_name} message: {error}"


def _tolerant_parser(message_type: type[Message]) -> Callable[[bytes], Message | _Malformed]:
    # grpc's own handling of a deserializer error is UNKNOWN ("Unexpected DecodeError"), a server-side failure in
    # every client's eyes; the client sent the bad bytes, so it gets INVALID_ARGUMENT instead.
    def parse(data: bytes) -> Message | _Malformed:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return _Malformed(message_type.DESCRIPTOR.full_name, str(exc))

    return parse


def _add_inference_service(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """Register every method of inference.GRPCInferenceService (as the generated code would, but with requests
    that fail to parse answered INVALID_ARGUMENT)."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        behaviour = getattr(servicer, method.name)

        async def handle(request: Any, context: grpc.aio.ServicerContext, behaviour: Any = behaviour) -> Any:
            if isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return await behaviour(request, context)

        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            handle,
            request_deserializer=_tolerant_parser(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


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
    _add_inference_service(InferenceServicer(dataplane, server_version), server)
    reporter = HealthReporter()
    health_pb2_grpc.add_HealthServicer_to_server(reporter.servicer, server)
    return server, reporter
