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
from sglite.runtime.server.errors import APIError, install_error_handlers
from sglite.runtime.server.metrics import ServerMetrics
from sglite.runtime.server.native_api import NativeServing
from sglite.runtime.server.openai_api import OpenAIServing
from sglite.runtime.server.rate_limit import RateLimiter, retry_after_header
from sglite.runtime.server.streaming import AsyncEngine, InflightRequests

ROUTES = (
    "/v1/chat/completions", "/v1/completions", "/v1/models", "/generate", "/flush_cache", "/get_server_info", "/health", "/metrics",
)


class AccessGuard:
    """Bearer-key check (401) then per-key rate limit (429); a FastAPI dependency of the API routes."""

    def __init__(self, config: ServerConfig) -> None:
        self.api_key = config.api_key.encode() if config.api_key else None
        self.limiter = RateLimiter(config.rate_limit) if config.rate_limit else None

    async def __call__(self, request: Request) -> None:
        presented = _bearer_token(request)
        if self.api_key is not None and not hmac.compare_digest((presented or "").encode(), self.api_key):
            raise APIError(
                401,
                "Incorrect API key provided." if presented else "Missing API key: send 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if self.limiter is not None:
            client = request.client.host if request.client else "unknown"
            wait = self.limiter.acquire(f"key:{presented}" if presented else f"addr:{client}")
            if wait > 0:
                raise APIError(
                    429,
                    f"Rate limit of {self.limiter.capacity:.0f} requests per minute reached; retry in {wait:.1f} s.",
                    code="rate_limit_exceeded",
                    headers=retry_after_header(wait),
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
        status = 500  # if the app raises before answering, ServerErrorMiddleware sends a 500

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
    shutting_down = asyncio.Event()

    async def drain(timeout: float) -> None:
        """Shutdown, first half: give open requests ``timeout`` s, then abort the rest in the engine."""
        shutting_down.set()
        deadline = time.monotonic() + timeout
        while len(inflight) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        inflight.abort_all()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        shutting_down.set()
        if owns_engine:
            await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="sglite", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.config = config
    app.state.metrics = metrics
    app.state.drain = drain  # called by GracefulServer.shutdown (see server.py)
    install_error_handlers(app)
    app.add_middleware(CountRequests, metrics=metrics)

    guarded = [Depends(AccessGuard(config))]
    app.add_api_route("/v1/chat/completions", openai.chat_completions, methods=["POST"], dependencies=guarded)
    app.add_api_route("/v1/completions", openai.completions, methods=["POST"], dependencies=guarded)
    app.add_api_route("/v1/models", openai.list_models, methods=["GET"], dependencies=guarded)
    app.add_api_route("/generate", native.generate, methods=["POST"], dependencies=guarded)
    app.add_api_route("/flush_cache", native.flush_cache, methods=["POST"], dependencies=guarded)
    app.add_api_route("/get_server_info", native.server_info, methods=["GET"], dependencies=guarded)

    @app.get("/health")
    async def health() -> Response:
        """200 while the engine takes requests (open without a key, for load balancers)."""
        if shutting_down.is_set():
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return JSONResponse({"status": "ok", "model": model_name})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app
