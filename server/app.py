"""build_app(engine, settings) -> FastAPI: lifespan (engine start in the background so /health can say
503 while loading; drain on shutdown), routes, exception handlers over the one table in http_errors,
and the Gatekeeper (request ids, auth, body cap, HTTP metrics)."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from sse_starlette.sse import AppStatus
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from .admin import admin_router, model_card
from .client import EngineClient, LoadState, ModelKind
from .errors import EngineDead, EngineNotReady, InvalidRequest, ServingError
from .http_errors import InternalError, MethodNotAllowed, RouteNotFound, ShuttingDown, error_response
from .metrics import Metrics
from .middleware import Gatekeeper, KeyChecker
from .openapi import install_openapi
from .protocol import ModelList
from .serving import GenerationHandler, resolve_model

if TYPE_CHECKING:
    from .settings import ServerSettings

log = logging.getLogger("server")


class ServerState:
    """Lifecycle of one app: loading → ready → draining. `on_fatal` lets __main__ stop uvicorn."""

    def __init__(self, engine: EngineClient, settings: ServerSettings):
        self.engine = engine
        self.settings = settings
        self.draining = False
        self.started = False  # the engine is up and the operator-named adapters were tried
        self.start_error: BaseException | None = None
        self.start_task: asyncio.Task | None = None
        self.drain_task: asyncio.Future | None = None
        self.on_fatal: Callable[[], None] | None = None

    def check_ready(self) -> None:
        if self.draining:
            raise ShuttingDown("The server is shutting down; retry shortly or on another instance.")
        if self.start_error is not None:
            raise EngineDead("The engine failed to start; see the server log.")
        if not (self.started and self.engine.ready):
            raise EngineNotReady("The model is still loading; retry shortly.")

    async def start(self) -> None:
        try:
            await self.engine.start()
        except Exception as e:  # report, then let __main__ exit non-zero
            self.start_error = e
            expected = isinstance(e, (ServingError, ValueError, OSError))  # bad folder, bad config: no traceback
            log.error("engine failed to start: %s", e, exc_info=not expected)
            if self.on_fatal is not None:
                self.on_fatal()
            return
        failures = {}
        for name in self.settings.adapters:  # operator-named adapters are validated now, not on first use
            try:
                await self.engine.load_adapter(name)
            except Exception as e:  # noqa: BLE001 - a refused adapter is reported, the server keeps serving
                failures[name] = getattr(e, "message", None) or str(e)
        refused = log_models(self.engine)
        for name, reason in failures.items():
            if name not in refused:
                log.warning("adapter %s refused: %s", name, reason)
        self.started = True

    def begin_drain(self) -> None:
        """Stop taking requests and let the engine finish running ones within --drain-timeout."""
        if self.drain_task is None:
            self.draining = True
            log.info("draining: waiting up to %.0f s for in-flight requests", self.settings.drain_timeout)
            self.drain_task = asyncio.ensure_future(self.engine.shutdown(self.settings.drain_timeout))

    async def drain(self) -> None:
        self.begin_drain()
        await self.drain_task


def log_models(engine: EngineClient) -> set[str]:
    """One line per model: the base, each adapter loaded/available, or refused with the reason."""
    refused = set()
    for info in engine.models():
        if info.kind is ModelKind.BASE:
            log.info("base model %s ready (max_model_len=%d, fingerprint=%s)", info.id, engine.max_model_len,
                     info.fingerprint)
        elif info.state is LoadState.FAILED:
            refused.add(info.id)  # the registry logged why when it refused it
        else:
            log.info("adapter %s %s (pre_seq_len=%d, prefix_projection=%s, version=%s)", info.id, info.state.value,
                     info.pre_seq_len, info.prefix_projection, info.version)
        for warning in info.warnings:
            log.warning("adapter %s: %s", info.id, warning)
    return refused


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServerState = app.state.server
    state.start_task = asyncio.create_task(state.start())
    try:
        yield
    finally:
        if not state.start_task.done():
            state.start_task.cancel()
        await state.drain()
        log.info("engine stopped")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServingError)
    async def serving_error(request: Request, exc: ServingError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(InvalidRequest(f"Invalid value for '{loc}': {first.get('msg', 'invalid')}", loc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            return error_response(RouteNotFound(f"Unknown request URL: {where}. See /docs for the routes."))
        if exc.status_code == 405:
            return error_response(MethodNotAllowed(f"Method not allowed: {where}"))
        response = error_response(InvalidRequest(str(exc.detail)))
        response.status_code = exc.status_code
        return response

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(InternalError("The server had an error while processing your request."))


def build_app(engine: EngineClient, settings: ServerSettings) -> FastAPI:
    AppStatus.disable_automatic_graceful_drain()  # streams drain with the engine, not cut at SIGTERM
    state = ServerState(engine, settings)
    metrics = Metrics(settings.max_metric_models, lambda: engine.base_model_id)
    metrics.watch_engine(engine.stats)
    handler = GenerationHandler(engine, metrics, state.check_ready)
    app = FastAPI(title="ChatGLM2 P-Tuning v2 server", version="0.1.0", lifespan=lifespan, redoc_url=None)
    app.state.server = state
    app.state.metrics = metrics

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handler.chat(request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handler.completion(request)

    @app.get("/v1/models")
    async def list_models() -> Response:
        state.check_ready()
        infos = sorted(engine.models(), key=lambda m: (m.kind is not ModelKind.BASE, m.id))
        body = ModelList(data=[model_card(m, engine) for m in infos])
        return Response(body.model_dump_json(), media_type="application/json")

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> Response:
        state.check_ready()
        info = next((m for m in engine.models() if m.id == model_id), None)
        if info is None:
            info = resolve_model(engine, model_id)
        return Response(model_card(info, engine).model_dump_json(), media_type="application/json")

    @app.get("/health")
    async def health() -> Response:
        try:
            state.check_ready()
        except ServingError as e:
            return error_response(e)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(admin_router(engine, settings.checkpoints, metrics))
    index = settings.static_dir / "index.html"
    if index.is_file():
        app.mount("/static", StaticFiles(directory=settings.static_dir), name="static")

        @app.get("/", include_in_schema=False)
        async def web_page() -> Response:
            return FileResponse(index)

    _install_error_handlers(app)
    install_openapi(app)
    app.add_middleware(Gatekeeper, keys=KeyChecker(settings.api_keys), max_body_bytes=settings.max_body_bytes,
                       metrics_auth=settings.metrics_auth, metrics=metrics)
    return app
