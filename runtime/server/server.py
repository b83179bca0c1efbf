"""Running the app under uvicorn with a shutdown that ends open requests cleanly.

uvicorn's own graceful shutdown waits for open connections and, past its timeout, cancels their
tasks mid-response (logging a traceback each). ``GracefulServer`` instead asks the app to drain:
open requests get ``graceful_shutdown_timeout`` seconds, then their engine requests are aborted,
so each stream still ends with an error event and ``[DONE]`` and each KV slot is freed.
"""

from __future__ import annotations

import asyncio
import socket
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from sglite.runtime.server.config import ServerConfig
from sglite.runtime.server.connections import guarded_h11_protocol

CANCEL_BACKSTOP_S = 5.0
"""uvicorn cancels what is still open this long after the drain aborted it (an engine that hangs)."""


class GracefulServer(uvicorn.Server):
    """``uvicorn.Server`` that drains ``app.state.drain`` before uvicorn's own shutdown completes."""

    def __init__(self, app: FastAPI, config: ServerConfig, **uvicorn_options: Any) -> None:
        super().__init__(
            uvicorn.Config(
                app,
                host=config.host,
                port=config.port,
                log_level=config.log_level,
                timeout_graceful_shutdown=config.graceful_shutdown_timeout + CANCEL_BACKSTOP_S,
                timeout_keep_alive=config.keep_alive_timeout,
                limit_concurrency=config.max_connections,
                http=guarded_h11_protocol(config.header_timeout, config.max_connections),
                lifespan="on",
                **uvicorn_options,
            )
        )
        self.app = app
        self.drain_timeout = config.graceful_shutdown_timeout
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The SIGTERM/SIGINT handler: admission closes here, not at uvicorn's next tick (up to 0.1 s
        later) or when the drain task first runs, so no request arriving after the signal is admitted."""
        self._close_admission()
        super().handle_exit(sig, frame)

    def _close_admission(self) -> None:
        close = getattr(self.app.state, "close_admission", None)
        if close is not None:
            close()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._close_admission()  # shutdown asked for without a signal (``should_exit = True``)
        drain = getattr(self.app.state, "drain", None)
        if drain is not None:
            # Runs alongside uvicorn's wait for open connections, which the aborts let finish.
            self._drain_task = asyncio.ensure_future(drain(self.drain_timeout))
        await super().shutdown(sockets)
        if self._drain_task is not None:
            await self._drain_task
