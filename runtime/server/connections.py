"""Connection-level limits uvicorn lacks: a deadline for request headers and a cap on open sockets.

uvicorn times out idle keep-alive connections but not a request that arrives slowly: a client that
sends half a header line (slowloris) or trickles it holds a socket forever. ``guarded_h11_protocol``
closes a connection whose request head is not complete ``header_timeout`` seconds after the
connection opened (or after its previous response), and refuses connections past ``max_connections``
at once, so slow sockets cannot exhaust the server. Body reads have their own deadline (``body.py``).
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("sglite.server")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head deadline and a connection cap (class attributes)."""

    header_timeout: float = 10.0
    max_connections: int = 1024

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            logger.warning("refusing a connection: %d open, the limit is %d", len(self.connections) - 1, self.max_connections)
            transport.close()
            return
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # a request head has started (or not) but is not complete
            self._arm_head_timer()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_deadline)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_deadline(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def guarded_h11_protocol(header_timeout: float, max_connections: int) -> type[GuardedH11Protocol]:
    """A ``GuardedH11Protocol`` class with these limits, for ``uvicorn.Config(http=...)``.

        >>> guarded_h11_protocol(5.0, 100).header_timeout
        5.0
    """
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout": header_timeout, "max_connections": max_connections})
