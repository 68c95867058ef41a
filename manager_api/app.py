"""The manager's FastAPI application: REST API under /api/v1, the etcd store, and (optionally) the deployer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aetcd
from aetcd import rpc
from aetcd.exceptions import ClientError, ConnectionFailedError, ConnectionTimeoutError, WatchTimeoutError
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from manager_api.artifacts import ArtifactStore, ArtifactStoreUnavailable, open_blob_store
from manager_api.auth import RequireToken, TokenStore, authorize
from manager_api.dependencies import Store
from manager_api.deployer.process import ProcessDeployer
from manager_api.deployer.registration import LeasedInstanceRegistry
from manager_api.errors import ERROR_RESPONSES, ApiProblem, install_error_handlers, unexpected_error
from manager_api.events import HEARTBEAT_SECONDS
from manager_api.request_bodies import RequestBodies
from manager_api.routers import applications, artifacts, deployments, events, instances, models, proxies
from manager_api.routers.events import StreamSlots
from manager_api.schemas import Health
from manager_api.settings import Settings
from manager_api.store.errors import ConflictError, HistoryCompacted, RevisionMismatch
from manager_api.store.records import CorruptRecord, RecordTooLarge
from manager_api.store.topology_store import TopologyStore
from manager_api.write_spans import WriteSpans
from protos.topology.keys import Keys
from protos.topology.nodes import Node
from xds_control.etcd_watch import ETCD_CLIENT_OPTIONS

log = logging.getLogger(__name__)

health_router = APIRouter(tags=["health"])


@health_router.get("/healthz", response_model=Health, responses={503: ERROR_RESPONSES["5XX"]})
async def healthz(store: Store) -> Health:
    """Live and able to reach etcd (503 otherwise)."""
    try:
        await store.ping()
    except Exception as exc:
        raise ApiProblem(503, f"etcd unreachable: {exc}") from exc
    return Health(status="ok", etcd="ok")


def _install_store_error_handlers(app: FastAPI) -> None:
    """Answers for the store's conditional-write and watch failures (with the revision a client needs next), and
    503 when the artifact store (an S3 endpoint) fails."""

    @app.exception_handler(RevisionMismatch)
    async def _mismatch(_: Request, exc: RevisionMismatch) -> JSONResponse:
        return JSONResponse(status_code=409, content={"error": str(exc), "current_revision": exc.current})

    @app.exception_handler(ConflictError)
    async def _contended(_: Request, exc: ConflictError) -> JSONResponse:
        # An unconditional write lost its compare-and-swap too often (many writers on one key): nothing was
        # written and a retry may well succeed, so 503 + Retry-After rather than a 409 without a revision.
        return JSONResponse(status_code=503, content={"error": str(exc)}, headers={"Retry-After": "1"})

    @app.exception_handler(CorruptRecord)
    async def _corrupt(request: Request, exc: CorruptRecord) -> JSONResponse:
        # The stored state is wrong, not the request: a 500, but one that names the key to fix.
        log.error("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(status_code=500, content={"error": str(exc)})

    @app.exception_handler(RecordTooLarge)
    async def _too_large(_: Request, exc: RecordTooLarge) -> JSONResponse:
        return JSONResponse(status_code=400, content={"error": str(exc)})

    @app.exception_handler(ArtifactStoreUnavailable)
    async def _artifacts_down(_: Request, exc: ArtifactStoreUnavailable) -> JSONResponse:
        # As for etcd: the store (an S3 endpoint) failed, not the request, and a retry may well succeed.
        return JSONResponse(status_code=503, content={"error": str(exc)}, headers={"Retry-After": "1"})

    @app.exception_handler(HistoryCompacted)
    async def _compacted(_: Request, exc: HistoryCompacted) -> JSONResponse:
        return JSONResponse(status_code=410, content={"error": str(exc)})

    @app.exception_handler(ConnectionFailedError)
    @app.exception_handler(ConnectionTimeoutError)
    async def _etcd_down(_: Request, exc: ClientError) -> JSONResponse:
        return _etcd_unavailable(str(exc))

    @app.exception_handler(WatchTimeoutError)
    async def _watch_not_opened(_: Request, exc: WatchTimeoutError) -> JSONResponse:
        # A watch (GET /events) that etcd did not create within the deadline; aetcd's exception has no message.
        return _etcd_unavailable(str(exc) or "it did not open a watch in time")

    @app.exception_handler(rpc.AioRpcError)
    async def _etcd_rpc_failed(request: Request, exc: rpc.AioRpcError) -> JSONResponse:
        # The store's transactions call etcd's gRPC stub itself, so their failures arrive unwrapped by aetcd.
        if exc.code() in _ETCD_DOWN_CODES:
            return _etcd_unavailable(exc.details() or exc.code().name)
        log.error("etcd failed on %s %s: %s", request.method, request.url.path, exc)
        return unexpected_error(exc)


#: gRPC codes of an etcd call that say etcd is down or too slow, not that the request was wrong.
_ETCD_DOWN_CODES = frozenset({rpc.StatusCode.UNAVAILABLE, rpc.StatusCode.DEADLINE_EXCEEDED})


def _etcd_unavailable(detail: str) -> JSONResponse:
    # 503 + Retry-After, as docs/manager_api.md says: nothing was written, and a retry may well succeed.
    return JSONResponse(
        status_code=503, content={"error": f"etcd is unavailable: {detail}"}, headers={"Retry-After": "1"}
    )


def create_app(settings: Settings) -> FastAPI:
    """Build the app; etcd is connected and the deployer started by the lifespan, not at import."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # A deadline on every unary call (reads, leases, status): a frozen or cut-off etcd is a 503 (and a lease
        # refresh that fails and is retried), not calls that wait for ever holding their requests and locks.
        client = aetcd.Client(
            host=settings.etcd_host,
            port=settings.etcd_port,
            options=ETCD_CLIENT_OPTIONS,
            timeout=settings.etcd_timeout,  # type: ignore[arg-type]  # aetcd says int; gRPC takes float seconds
        )
        await client.connect()
        keys = Keys(settings.prefix)
        store = TopologyStore(client, keys, write_timeout=settings.etcd_timeout)
        root = settings.data_dir / "artifacts"
        blobs = await asyncio.to_thread(open_blob_store, settings.artifact_store, root, settings.s3_endpoint)
        artifacts = ArtifactStore(root, settings.max_upload_bytes, blobs=blobs)
        app.state.store = store
        app.state.artifacts = artifacts
        registry: LeasedInstanceRegistry | None = None
        deployer: ProcessDeployer | None = None
        if settings.deployer == "process":
            node = Node(name=settings.node, advertise_address=settings.advertise_address)
            registry = LeasedInstanceRegistry(client, keys, settings.node, announce=node)
            await registry.start()
            deployer = ProcessDeployer(
                store,
                artifacts,
                registry,
                node=settings.node,
                advertise_address=settings.advertise_address,
                xds_host=settings.xds_host,
                xds_port=settings.xds_port,
                workdir=settings.data_dir / "replicas",
                drain_seconds=settings.drain_seconds,
                ads_api_type=settings.ads_api_type,
            )
            await deployer.start()
        app.state.deployer = deployer
        log.info(
            "manager_api ready: etcd %s:%d prefix %s, artifacts in %s",
            *(settings.etcd_host, settings.etcd_port, settings.prefix, blobs.location),
        )
        try:
            yield
        finally:
            if deployer is not None:
                await deployer.stop()
            if registry is not None:
                await registry.stop()
            await client.close()

    app = FastAPI(
        title="Hydro Serving manager",
        version="0.1.0",
        description="Register model versions, deploy them, and route applications to them.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    _install_store_error_handlers(app)
    # Outside the routes (bodies are checked before FastAPI reads them), inside WriteSpans (its span sees the 413).
    app.add_middleware(RequestBodies, max_upload_bytes=settings.max_upload_bytes)
    # Outside RequestBodies: a request without a valid token is answered before any of its body is read.
    app.add_middleware(RequireToken)
    # Inside the server-error middleware, outside the exception handlers: the span sees every answer's status.
    app.add_middleware(WriteSpans)
    app.state.events_heartbeat = HEARTBEAT_SECONDS
    app.state.event_streams = StreamSlots(settings.max_event_streams)
    app.state.settings = settings
    app.state.tokens = TokenStore.load(settings.tokens_file) if settings.tokens_file is not None else None
    api = APIRouter(prefix="/api/v1", dependencies=[Depends(authorize)], responses=ERROR_RESPONSES)
    for module in (models, artifacts, deployments, applications, instances, proxies, events):
        api.include_router(module.router)
    app.include_router(api)
    app.include_router(health_router)
    return app
