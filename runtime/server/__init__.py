"""The OpenAI-compatible HTTP server: ``create_app(engine, ServerConfig(...))`` or ``python -m sglite serve``."""

from __future__ import annotations

from sglite.runtime.server.app import create_app
from sglite.runtime.server.config import ServerConfig
from sglite.runtime.server.server import GracefulServer

__all__ = ["GracefulServer", "ServerConfig", "create_app"]
