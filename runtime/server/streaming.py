"""Driving engine requests from HTTP handlers: submit, merge streams, SSE framing, abort on disconnect.

Every engine request a handler starts gets a request id chosen here, so the handler can always
``engine.abort(rid)`` it, whichever way the client goes away (stream closed, connection dropped,
server shutting down). An aborted request frees its KV slots (or hands them to the radix cache).
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Sequence
from typing import Any, Protocol

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Send

from sglite.runtime.engine import EngineShutdownError, RequestFailedError
from sglite.runtime.input_processor import ContextLengthError
from sglite.runtime.server.errors import APIError, invalid_request, request_failed

Chunk = dict[str, Any]


class AsyncEngine(Protocol):
    """The part of ``sglite.Engine`` the server uses."""

    tokenizer: Any
    context_length: int

    async def async_generate(self, prompt: Any = None, sampling_params: Any = None, stream: bool = False, **kwargs: Any) -> Any: ...

    def abort(self, rid: str) -> None: ...

    def get_stats(self) -> dict[str, int | float]: ...


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _engine_error(exc: Exception) -> APIError:
    """Map what ``async_generate`` raises before queuing to an HTTP error; re-raise anything else (a bug)."""
    if isinstance(exc, ContextLengthError):
        return invalid_request(str(exc), param="max_new_tokens", code="context_length_exceeded")
    if isinstance(exc, ValueError):  # includes constraints.ConstraintError: the client's input is bad
        return invalid_request(str(exc), param=rejected_field(exc))
    if isinstance(exc, EngineShutdownError):
        return shutting_down_error()
    if isinstance(exc, RequestFailedError):
        return request_failed(exc.rid, exc.detail)
    raise exc


def rejected_field(exc: ValueError) -> str | None:
    """The request field a validation error names: a constraint error's ``param``, else the quoted name of
    ``sampling parameter 'x'`` in the engine's messages.

        >>> rejected_field(ValueError("sampling parameter 'top_k' must be >= -1, got -2"))
        'top_k'
    """
    param = getattr(exc, "param", None)
    if param:
        return param
    match = re.search(r"sampling parameter '(\w+)'", str(exc))
    return match.group(1) if match else None


def shutting_down_error() -> APIError:
    return APIError(503, "the server is shutting down; retry on another replica", code="shutting_down")


async def open_stream(engine: AsyncEngine, prompt: str | list[int], params: dict[str, Any], rid: str, **kwargs: Any) -> AsyncIterator[Chunk]:
    """Validate and start one streamed engine request; bad input raises a 400 before any byte is sent."""
    try:
        return await engine.async_generate(prompt, params, stream=True, rid=rid, **kwargs)
    except (ValueError, RuntimeError) as exc:
        raise _engine_error(exc) from exc


class InflightRequests:
    """Engine requests this app started and has not seen finish: the owner of "what to abort".

    Handlers register rids when they submit and release them when done; at shutdown the app
    aborts whatever is left, so open streams end with an error event instead of being cut.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._rids: set[str] = set()
        self.closing = False
        """Set when shutdown starts: no new engine request is started after it (503 instead)."""

    def add(self, rids: Iterable[str]) -> None:
        """Register ``rids`` (all or none); a 400 if one is already in flight, which is left untouched.

        Checked here, before anything reaches the engine, because every later failure path aborts
        the handler's rids by id: a duplicate registered first would abort someone else's request.
        """
        if self.closing:  # e.g. a prompt that was still being tokenized when SIGTERM came
            raise shutting_down_error()
        rids = list(rids)
        taken = [rid for rid in rids if rid in self._rids]
        if taken or len(set(rids)) != len(rids):
            rid = taken[0] if taken else next(r for r in rids if rids.count(r) > 1)
            raise invalid_request(f"rid {rid!r} is already used by a request in flight; choose a unique rid", param="rid", code="duplicate_rid")
        self._rids.update(rids)

    def release(self, rids: Iterable[str], abort: bool) -> None:
        """Forget ``rids``; with ``abort`` also stop them in the engine (unknown or finished ids are ignored)."""
        for rid in rids:
            if rid in self._rids:
                self._rids.discard(rid)
                if abort:
                    self.engine.abort(rid)

    def close(self) -> None:
        """Admit nothing more (every route answers 503); synchronous and idempotent, so a signal handler
        may call it: from that instant no request is admitted, which is what makes shutdown atomic."""
        self.closing = True

    def abort_all(self) -> None:
        self.close()
        for rid in list(self._rids):
            self.engine.abort(rid)

    def __len__(self) -> int:
        return len(self._rids)


async def generate_all(
    request: Request, inflight: InflightRequests, calls: Sequence[tuple[str | list[int], dict[str, Any], str]], **kwargs: Any
) -> list[Chunk]:
    """Run ``(prompt, sampling_params, rid)`` engine requests concurrently; all results, in order.

    If the client disconnects first, every unfinished request is aborted and ``ClientDisconnected`` raised.
    """
    engine = inflight.engine

    async def one(prompt: str | list[int], params: dict[str, Any], rid: str) -> Chunk:
        try:
            return await engine.async_generate(prompt, params, rid=rid, **kwargs)
        except (ValueError, RuntimeError) as exc:
            raise _engine_error(exc) from exc

    rids = [rid for _, _, rid in calls]
    inflight.add(rids)
    work = asyncio.ensure_future(asyncio.gather(*(one(*call) for call in calls)))
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    succeeded = False
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            raise ClientDisconnected()
        outputs = work.result()
        succeeded = True
        return outputs
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
            # A cancelled gather *fails* with CancelledError; unretrieved, asyncio logs it with a traceback
            # for every request its client abandoned. Nobody wants that result: consume it.
            work.add_done_callback(_consume_outcome)
        # gather does not stop the siblings of a request that failed: abort them all.
        inflight.release(rids, abort=not succeeded)


def _consume_outcome(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


async def open_streams(
    inflight: InflightRequests, calls: Sequence[tuple[str | list[int], dict[str, Any], str]], **kwargs: Any
) -> list[AsyncIterator[Chunk]]:
    """``open_stream`` for each call, registered in ``inflight``; all or none (a 400 aborts those opened)."""
    streams: list[AsyncIterator[Chunk]] = []
    rids = [rid for _, _, rid in calls]
    inflight.add(rids)
    try:
        for prompt, params, rid in calls:
            streams.append(await open_stream(inflight.engine, prompt, params, rid, **kwargs))
    except BaseException:
        inflight.release(rids, abort=True)
        raise
    return streams


class ClientDisconnected(APIError):
    """The client went away before its response was ready (nginx's 499; nobody reads the body)."""

    def __init__(self) -> None:
        super().__init__(499, "client disconnected", code="client_disconnected")


async def wait_for_disconnect(request: Request) -> None:
    """Return when the client closes the connection (call only after the body has been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def merge_streams(streams: Sequence[AsyncIterator[Chunk]]) -> AsyncIterator[tuple[int, Chunk]]:
    """Interleave several engine streams as ``(index, chunk)`` in arrival order."""
    if len(streams) == 1:
        async for chunk in streams[0]:
            yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, Chunk | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Chunk]) -> None:
        try:
            async for chunk in stream:
                await queue.put((index, chunk))
            await queue.put((index, None))
        except Exception as exc:  # surfaced to the consumer below
            await queue.put((index, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


LINE_BREAKS_ESCAPED = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})
"""JSON escapes for the characters Python's ``str.splitlines`` takes for line ends and JSON leaves raw
(pydantic and ``json.dumps`` escape the ASCII ones, not these). SSE ends lines at CR/LF only, but
clients that split with ``splitlines`` (httpx's ``aiter_lines``) would cut an event holding one in two."""


def sse(payload: str) -> str:
    """One server-sent event carrying ``payload`` (a JSON text or ``[DONE]``; OpenAI's framing: ``data: ...``
    and a blank line). Inside JSON those characters can only sit in strings, where the escape means the same."""
    return f"data: {payload.translate(LINE_BREAKS_ESCAPED)}\n\n"


SSE_DONE = sse("[DONE]")


async def sse_stream(events: AsyncGenerator[str, None], on_exit: Callable[[], None]) -> AsyncGenerator[str, None]:
    """Frame a handler's events as an SSE body: ``[DONE]`` last, ``on_exit`` always.

    The status line is sent before the first event, so an ``APIError`` raised mid-stream is
    reported in-band as ``data: {"error": ...}``, as OpenAI does (the openai SDK raises on it).
    """
    try:
        try:
            async for event in events:
                yield event
        except APIError as exc:
            yield sse(json.dumps(exc.body()))
        yield SSE_DONE
    finally:
        await events.aclose()
        on_exit()


class SSEResponse(StreamingResponse):
    """A text/event-stream response that always closes its generator, even when the client vanished.

    Starlette cancels the send loop on disconnect but leaves the generator suspended until garbage
    collection; closing it here (shielded from that cancellation) runs the handler's ``finally``,
    which aborts the engine requests at once.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
