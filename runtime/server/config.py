"""HTTP server configuration: one frozen dataclass; ``python -m sglite serve`` flags are generated from it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    """Options of the OpenAI-compatible HTTP server (not of the engine behind it).

        >>> ServerConfig(port=8000, api_key="sk-local", rate_limit=60).port
        8000
    """

    host: str = "127.0.0.1"
    """Interface to listen on; loopback by default so a server is never exposed by accident."""
    port: int = 30000
    """TCP port to listen on (0 picks a free one)."""
    api_key: str | None = None
    """When set, every /v1 and /generate request needs ``Authorization: Bearer <key>``."""
    rate_limit: int | None = None
    """Requests per minute allowed per API key (per client address without a key); None is unlimited."""
    max_body_bytes: int = 8 * 1024 * 1024
    """Larger request bodies are refused with 413 before they are parsed."""
    served_model_name: str | None = None
    """Model id reported by /v1/models and in responses; None uses the model directory's name."""
    max_choices: int = 64
    """Most completions one request may ask for (``n`` times the number of prompts)."""
    header_timeout: float = 10.0
    """A connection whose request line and headers are not complete this many seconds after it opened
    (or after its previous response) is closed: slow-header (slowloris) clients cannot hold sockets."""
    body_timeout: float = 30.0
    """Reading a request body may take this long; a body shorter than its Content-Length gets 408."""
    keep_alive_timeout: float = 5.0
    """Idle keep-alive connections are closed after this many seconds."""
    max_connections: int = 1024
    """Open connections past this are refused at once; requests past it in flight get 503."""
    graceful_shutdown_timeout: float = 5.0
    """Seconds open streams may keep running after shutdown starts; then they are aborted."""
    incremental_streaming_output: bool = False
    """A streamed ``/generate`` sends in ``text`` and ``output_ids`` only what is new in each event (SGLang's
    flag of the same name): linear bytes for long generations. Off, they hold everything so far, which
    SGLang's client (``RuntimeEndpoint``) expects."""
    log_level: str = "info"
    """uvicorn's log level: ``critical``, ``error``, ``warning``, ``info``, ``debug`` or ``trace``."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty; leave it unset to disable authentication")
        if self.rate_limit is not None and self.rate_limit < 1:
            raise ValueError(f"rate_limit must be at least 1 request/min (or None for unlimited), got {self.rate_limit}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        if self.max_choices < 1:
            raise ValueError(f"max_choices must be at least 1, got {self.max_choices}")
        for name in ("header_timeout", "body_timeout", "keep_alive_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {self.max_connections}")
        if self.graceful_shutdown_timeout < 0:
            raise ValueError(f"graceful_shutdown_timeout must be >= 0, got {self.graceful_shutdown_timeout}")
        if self.log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ValueError(f"log_level must be one of critical, error, warning, info, debug, trace; got {self.log_level!r}")
