"""The FastAPI application: routes, access control, metrics and lifecycle around one shared engine.

    >>> import sglite
    >>> from sglite.runtime.server import GracefulServer, ServerConfig, create_app
    >>> engine = sglite.Engine("path/to/model")                                  # doctest: +SKIP
    >>> config = ServerConfig(port=30000, api_key="sk-local")
    >>> GracefulServer(create_app(engine, config, owns_engine=True), config).run()  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sglite.runtime.server.config import ServerConfig
from sglite.runtime.server.embeddings_api import EmbeddingServing, generation_dependencies
from sglite.runtime.server.errors import APIError, install_error_handlers, internal_error
from sglite.runtime.server.metrics import ServerMetrics
from sglite.runtime.server.native_api import NativeServing
from sglite.runtime.server.openai_api import OpenAIServing
from sglite.runtime.server.rate_limit import RateLimiter, retry_after_header
from sglite.runtime.server.streaming import AsyncEngine, InflightRequests, shutting_down_error

ROUTES = (
    "/v1/chat/completions", "/v1/completions", "/v1/models", "/generate", "/flush_cache", "/get_server_info", "/health", "/metrics",
    "/server_info", "/model_info", "/get_model_info", "/health_generate", "/concate_and_append_request",
    "/v1/embeddings", "/encode",
)


class AccessGuard:
    """Rate limit (429) then bearer key (401); a FastAPI dependency of the API routes.

    The rate limit is keyed by client address and comes before the key check, so a client cannot
    mint fresh buckets with made-up keys and failed key guesses are limited like any request.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.api_key = config.api_key.encode() if config.api_key else None
        self.limiter = RateLimiter(config.rate_limit) if config.rate_limit else None

    async def __call__(self, request: Request) -> None:
        if self.limiter is not None:
            client = request.client.host if request.client else "unknown"
            wait = self.limiter.acquire(f"addr:{client}")
            if wait > 0:
                raise APIError(
                    429,
                    f"Rate limit of {self.limiter.capacity:.0f} requests per minute reached; retry in {wait:.1f} s.",
                    code="rate_limit_exceeded",
                    headers=retry_after_header(wait),
                )
        presented = _bearer_token(request)
        if self.api_key is not None and not hmac.compare_digest((presented or "").encode(), self.api_key):
            raise APIError(
                401,
                "Incorrect API key provided." if presented else "Missing API key: send 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )


def _bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return request.headers.get("x-api-key")  # what some non-OpenAI clients send


class CountRequests:
    """Pure ASGI middleware counting responses by route and status (streams count at their start).

    Unknown paths share one ``other`` label so a scanner cannot grow the metric without bound.
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.requests.labels(route, str(status)).inc()


class RefuseWhenShuttingDown:
    """Pure ASGI middleware answering every request 503 once shutdown has started.

    It reads ``inflight.closing``, which ``close_admission`` sets synchronously from the SIGTERM handler
    (see ``GracefulServer.handle_exit``): no request is admitted between the signal and the drain, on
    any route. Requests admitted before it run on (the drain gives them their time); one already past
    this check but not yet submitted gets its 503 from ``InflightRequests.add``.
    """

    def __init__(self, app: ASGIApp, inflight: InflightRequests) -> None:
        self.app = app
        self.inflight = inflight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.inflight.closing:
            await shutting_down_error().response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


class CatchServerErrors:
    """Pure ASGI middleware answering an unhandled exception with a generic 500 and an error id.

    Unlike an ``Exception`` handler (after which Starlette re-raises, and uvicorn closes the
    connection) the exception stops here, so the client's keep-alive connection stays usable. If
    the response had already started (a stream), its body is ended cleanly instead.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = finished = False

        async def tracked_send(message: Message) -> None:
            nonlocal started, finished
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception:
            error = internal_error(scope.get("method", "?"), scope.get("path", "?"))
            if not started:
                await JSONResponse(error.body(), status_code=500)(scope, receive, send)
            elif not finished:
                await send({"type": "http.response.body", "body": b"", "more_body": False})


def served_model_name(engine: AsyncEngine, config: ServerConfig) -> str:
    if config.served_model_name:
        return config.served_model_name
    path = getattr(engine, "model_path", None)
    return Path(str(path)).name if path else "sglite"


def create_app(engine: AsyncEngine, config: ServerConfig | None = None, *, owns_engine: bool = False) -> FastAPI:
    """An OpenAI-compatible app over ``engine``; every request shares (and is batched by) it.

    With ``owns_engine`` the app's shutdown calls ``engine.shutdown()``, which aborts whatever is
    still running; otherwise the engine outlives the app (tests build many apps over one engine).
    """
    config = config or ServerConfig()
    model_name = served_model_name(engine, config)
    metrics = ServerMetrics(engine, model_name)
    inflight = InflightRequests(engine)
    openai = OpenAIServing(inflight, config, metrics, model_name)
    native = NativeServing(inflight, config, model_name)

    async def drain(timeout: float) -> None:
        """Shutdown, first half: give open requests ``timeout`` s, then abort the rest in the engine."""
        inflight.close()  # already closed by the signal handler, normally; requests still tokenizing get 503 too
        deadline = time.monotonic() + timeout
        while len(inflight) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        inflight.abort_all()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        inflight.close()
        if owns_engine:
            await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="sglite", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.config = config
    app.state.metrics = metrics
    app.state.drain = drain  # called by GracefulServer.shutdown (see server.py)
    app.state.close_admission = inflight.close  # called by GracefulServer.handle_exit, in the signal handler
    install_error_handlers(app)
    app.add_middleware(RefuseWhenShuttingDown, inflight=inflight)
    app.add_middleware(CatchServerErrors)
    app.add_middleware(CountRequests, metrics=metrics)  # outermost of the two: it counts the 500s

    guarded = [Depends(AccessGuard(config))]
    generating = guarded + generation_dependencies(engine)  # an embedding-only engine: 400 saying why
    app.add_api_route("/v1/chat/completions", openai.chat_completions, methods=["POST"], dependencies=generating)
    app.add_api_route("/v1/completions", openai.completions, methods=["POST"], dependencies=generating)
    app.add_api_route("/v1/models", openai.list_models, methods=["GET"], dependencies=guarded)
    native.register(app, guarded)
    EmbeddingServing(engine, config, model_name).register(app, guarded)

    @app.get("/health")
    async def health() -> Response:
        """200 while the engine takes requests (open without a key, for load balancers); 503 once
        shutdown has started, like every route (``RefuseWhenShuttingDown``)."""
        return JSONResponse({"status": "ok", "model": model_name})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app
