"""The pipeline as both protocol front-ends see it: addressing, readiness, metadata and inference."""

from __future__ import annotations

from typing import NoReturn

from prometheus_client import CollectorRegistry

from runtimes.errors import ModelNotFound, ModelNotReady, NotSupported
from runtimes.messages import InferRequest, InferResponse, ModelMetadata, TensorMetadata, check_requested_output
from runtimes.pipeline.executor import PipelineExecutor, PipelineResult
from runtimes.pipeline.shadows import ShadowRunner
from runtimes.pipeline.spec import PipelineSpec
from runtimes.pipeline.wire import output_tensors, pipeline_inputs

PLATFORM = "pipeline"


class PipelineService:
    """One application's pipeline; answers requests naming the application (no version)."""

    def __init__(
        self,
        spec: PipelineSpec,
        executor: PipelineExecutor,
        metrics: CollectorRegistry,
        shadows: ShadowRunner | None = None,
    ) -> None:
        self.spec = spec
        self.executor = executor
        self.metrics = metrics
        self.shadows = shadows
        self.ready = False

    @property
    def name(self) -> str:
        return self.spec.name

    def resolve(self, name: str, version: str = "") -> None:
        """ModelNotFound unless ``name`` is this application (applications have no versions)."""
        if name != self.name:
            raise ModelNotFound(f"model {name!r} is not served here (this pipeline serves application {self.name!r})")
        if version:
            raise ModelNotFound(f"application {self.name!r} has no versions; address it as {self.name!r} alone")

    def check_ready(self) -> None:
        """ModelNotReady while starting or shutting down."""
        if not self.ready:
            raise ModelNotReady(f"the pipeline of application {self.name!r} is not ready")

    def metadata(self, name: str, version: str = "") -> ModelMetadata:
        """The pipeline's signature: the first stage's inputs and the last stage's outputs."""
        self.resolve(name, version)
        signature = self.spec.signature
        return ModelMetadata(
            name=self.name,
            versions=[],
            platform=PLATFORM,
            inputs=[TensorMetadata(t.name, t.datatype, list(t.shape)) for t in signature.inputs],
            outputs=[TensorMetadata(t.name, t.datatype, list(t.shape)) for t in signature.outputs],
        )

    def config(self, name: str, version: str = "") -> NoReturn:
        """NotSupported (once ``name`` is known to be this application): a pipeline has no model configuration."""
        self.resolve(name, version)
        raise NotSupported("a pipeline has no model configuration; use its model metadata")

    def statistics(self, name: str, version: str = "") -> NoReturn:
        """NotSupported (once ``name``, if any, is known to be this application): a pipeline keeps no statistics."""
        if name or version:  # no name: Triton's "every model"
            self.resolve(name, version)
        raise NotSupported("a pipeline keeps no statistics; ask each stage's model version, or /metrics")

    async def infer(self, request: InferRequest, deadline: float | None = None) -> PipelineResult:
        """Check the request against the pipeline's signature and run it through every stage."""
        self.resolve(request.model_name, request.model_version)
        self.check_ready()
        inputs = pipeline_inputs(request.inputs, self.spec.signature.inputs, self.name)
        for output in request.outputs:
            check_requested_output(output)
        requested = [o.name for o in request.outputs]
        return await self.executor.run(inputs, requested, deadline, request.id)

    def send_shadows(self, result: PipelineResult) -> None:
        """Start the result's shadow calls; the front-ends call it once the caller's answer is on its way."""
        if self.shadows is not None and result.shadows:
            self.shadows.submit(result.shadows)

    def response(self, result: PipelineResult, request: InferRequest) -> InferResponse:
        """The decoded answer, for the REST and typed gRPC encoders."""
        return InferResponse(self.name, "", output_tensors(result.outputs), request.id)
