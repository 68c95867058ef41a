"""Runs one request through the stages: each stage is one ModelInfer call through the sidecar's outbound listener.

The stage is named by the ``x-hydro-stage: {app}/{index}`` header; the sidecar's route for it picks a variant by
weight and applies the deployment's retries, timeouts and circuit breaking. Outputs go to the next stage by name
as raw bytes. A stage error ends the request with an error naming the stage and keeping its status class.

Time budget: the whole pipeline has ``min(timeout, the caller's deadline)``; each stage gets an equal share of what
is left when it starts (so time a fast stage does not use goes to the later ones), enforced by the gRPC deadline of
the call and by Envoy (``x-envoy-upstream-rq-timeout-ms``).
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc

from protos import inference_pb2 as pb
from runtimes.dataplane import APPLICATION_HEADER
from runtimes.errors import InferenceError, InvalidInput
from runtimes.pipeline.outbound import OutboundChannel
from runtimes.pipeline.shadows import StageShadows
from runtimes.pipeline.spans import Metadata, stage_span, trace_metadata
from runtimes.pipeline.spec import PipelineSpec, StagePlan
from runtimes.pipeline.wire import WireTensor, response_outputs
from tracing.provider import active_tracer

#: Outbound requests name their stage with ``{app}/{index}`` (1-based) in this header.
STAGE_HEADER = "x-hydro-stage"
#: Response header naming the model version that answered each stage: ``1=fe:1;2=clf:2;3=post:1``.
STAGES_HEADER = "x-hydro-stages"
#: The sidecar adds ``model:version/instance`` to every answer of a model runtime.
SERVED_BY_HEADER = "x-hydro-served-by"
ENVOY_TIMEOUT_HEADER = "x-envoy-upstream-rq-timeout-ms"

#: HTTP status of each gRPC status a stage may end with (the OIP's own mapping, as the runtimes use it).
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


#: What grpc's details say when an answer is over the channel's max_receive_message_length.
_RECEIVED_TOO_LARGE = "Received message larger than max"


class StageError(InferenceError):
    """A stage failed; carries the stage's own status (INVALID_ARGUMENT stays 400, UNAVAILABLE 503...)."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.grpc_code = code.name
        self.http_status = _HTTP_STATUS.get(code, 500)


@dataclass(frozen=True)
class PipelineResult:
    """The last stage's outputs, the model version that answered each stage, and the shadow calls still to make."""

    outputs: list[WireTensor]
    served: list[str]  # "model:version", one per stage
    #: For the front-end to hand to ShadowRunner.submit once the caller has its answer.
    shadows: tuple[StageShadows, ...] = ()

    @property
    def stages_header(self) -> str:
        return ";".join(f"{index}={key}" for index, key in enumerate(self.served, start=1))


def _served_by(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == SERVED_BY_HEADER:
            text = value.decode() if isinstance(value, bytes) else value
            return text.split("/", 1)[0]
    return None


class PipelineExecutor:
    """Calls the stages of one pipeline through one long-lived HTTP/2 connection to the outbound listener."""

    def __init__(
        self,
        spec: PipelineSpec,
        outbound: str,
        *,
        timeout: float = 30.0,
        max_message_bytes: int = 64 * 2**20,
    ) -> None:
        self.spec = spec
        self.timeout = timeout
        self._outbound = OutboundChannel(outbound, max_message_bytes)
        self._max_message_bytes = max_message_bytes
        self.call = self._outbound.call
        self._last_names = {t.name for t in spec.stages[-1].outputs}

    async def close(self) -> None:
        """Close the channel (calls still running fail with CANCELLED)."""
        await self._outbound.close()

    def check_outputs(self, requested: Sequence[str]) -> None:
        """InvalidInput unless every requested output is one of the pipeline's outputs."""
        for name in requested:
            if name not in self._last_names:
                raise InvalidInput(
                    f"unknown output {name!r} requested; application {self.spec.name!r} has outputs: "
                    f"{', '.join(t.name for t in self.spec.stages[-1].outputs)}"
                )

    async def run(
        self,
        inputs: Sequence[WireTensor],
        requested: Sequence[str] = (),
        deadline: float | None = None,
        request_id: str = "",
    ) -> PipelineResult:
        """Run every stage in order; ``deadline`` (time.monotonic()) is the caller's, if it has one."""
        self.check_outputs(requested)
        end = time.monotonic() + self.timeout
        if deadline is not None:
            end = min(end, deadline)
        current: Mapping[str, WireTensor] = {t.name: t for t in inputs}
        served: list[str] = []
        shadowed: list[StageShadows] = []
        stages = self.spec.stages
        for position, plan in enumerate(stages):
            if position + 1 < len(stages):
                wanted: Sequence[str] = [t.name for t in stages[position + 1].inputs]
            else:
                wanted = requested
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise StageError(
                    f"stage {plan.index} ({plan.variants}) of application {self.spec.name!r} was not called: the "
                    "pipeline's time budget is spent",
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                )
            share = remaining / (len(stages) - position)
            request = self._stage_request(plan, current, wanted, request_id)
            current, answered_by = await self._call_stage(plan, request, share)
            missing = [name for name in wanted if name not in current]
            if missing:
                raise StageError(
                    f"stage {plan.index} ({answered_by}) of application {self.spec.name!r} gave no output "
                    f"{', '.join(map(repr, missing))}",
                    grpc.StatusCode.INTERNAL,
                )
            served.append(answered_by)
            if plan.shadows:
                # Only references: the copies are made by the shadow calls, after the caller has its answer.
                shadowed.append(StageShadows(plan.index, plan.shadows, request, current, contextvars.copy_context()))
        return PipelineResult(list(current.values()), served, tuple(shadowed))

    def _stage_request(
        self, plan: StagePlan, current: Mapping[str, WireTensor], wanted: Sequence[str], request_id: str
    ) -> pb.ModelInferRequest:
        # The application's name as the model name: the outbound route sets x-hydro-application to it, which
        # every variant's runtime accepts as naming itself (as behind the ingress).
        request = pb.ModelInferRequest(model_name=self.spec.name, id=request_id)
        for spec in plan.inputs:
            tensor = current[spec.name]
            request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
            request.raw_input_contents.append(tensor.raw)
        for name in wanted:
            request.outputs.add(name=name)
        return request

    async def _call_stage(
        self, plan: StagePlan, request: pb.ModelInferRequest, budget: float
    ) -> tuple[dict[str, WireTensor], str]:
        tracer = active_tracer()
        if tracer is None:
            return await self._send_stage(plan, request, budget, ())
        with stage_span(tracer, self.spec.name, plan.index) as span:
            outputs, answered_by = await self._send_stage(plan, request, budget, trace_metadata(span))
            span.set_attribute("hydro.variant", answered_by)
            return outputs, answered_by

    async def _send_stage(
        self, plan: StagePlan, request: pb.ModelInferRequest, budget: float, trace_context: Metadata
    ) -> tuple[dict[str, WireTensor], str]:
        metadata = (
            (STAGE_HEADER, f"{self.spec.name}/{plan.index}"),
            (APPLICATION_HEADER, self.spec.name),
            (ENVOY_TIMEOUT_HEADER, str(max(1, int(budget * 1000)))),
            *trace_context,
        )
        try:
            response = await self.call(request, timeout=budget, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            who = _served_by(exc.initial_metadata()) or plan.variants
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and _RECEIVED_TOO_LARGE in (exc.details() or ""):
                # This runtime's own receive limit, not the stage's "slow down": the OIP's 429 would have the client
                # retry a request that can never succeed.
                raise StageError(
                    f"stage {plan.index} ({who}) of application {self.spec.name!r} answered more than the "
                    f"pipeline's {self._max_message_bytes // 2**20} MiB message limit (--max-message-mb): "
                    f"{exc.details()}",
                    grpc.StatusCode.INTERNAL,
                ) from None
            raise StageError(
                f"stage {plan.index} ({who}) of application {self.spec.name!r} failed: "
                f"{exc.code().name}: {exc.details()}",
                exc.code(),
            ) from None
        except Exception as exc:
            # grpc raises its own errors, not AioRpcError, for a call it refuses to start (bad metadata, a closed
            # channel): still this stage's failure, and the caller must learn which stage. (Their text lists grpc's
            # batch operations with their addresses: cut short.)
            detail = str(exc)
            raise StageError(
                f"stage {plan.index} ({plan.variants}) of application {self.spec.name!r} could not be called: "
                f"{type(exc).__name__}: {detail[:200]}{'...' if len(detail) > 200 else ''}",
                grpc.StatusCode.INTERNAL,
            ) from exc
        try:
            outputs = response_outputs(response)
        except Exception as exc:
            # Whatever is wrong in the answer is the stage's fault, never the caller's (InvalidInput would say 400).
            reason = str(exc) if isinstance(exc, InferenceError) else f"{type(exc).__name__}: {exc}"
            raise StageError(
                f"stage {plan.index} ({response.model_name}:{response.model_version}) of application "
                f"{self.spec.name!r} answered an unreadable response: {reason}",
                grpc.StatusCode.INTERNAL,
            ) from None
        return outputs, f"{response.model_name}:{response.model_version}"
