"""Reading a JSON request body safely: media type, size limit (declared and actual), emptiness."""

from __future__ import annotations

import asyncio

from starlette.requests import Request

from sglite.runtime.server.errors import APIError, invalid_request


async def read_json_body(request: Request, max_bytes: int, timeout: float = 30.0) -> bytes:
    """The raw body of a JSON request, or an ``APIError`` (400, 408, 413 or 415) that says what is wrong.

    The size is checked twice: against ``Content-Length`` before reading anything, and while
    reading, because a chunked upload declares no length (and a declared one may lie). A body that
    is not complete within ``timeout`` seconds (one shorter than its Content-Length) gets 408.
    """
    try:
        return await asyncio.wait_for(_read_json_body(request, max_bytes), timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout") from None


async def _read_json_body(request: Request, max_bytes: int) -> bytes:
    content_type = request.headers.get("content-type")
    if content_type is not None:
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type != "application/json" and not media_type.endswith("+json"):
            raise APIError(415, f"Content-Type must be application/json, got {media_type or 'an empty value'!r}", code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise invalid_request(f"invalid Content-Length header {declared!r}")
        if int(declared) > max_bytes:
            raise _too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        raise invalid_request("request body is empty; send a JSON object", code="invalid_json")
    return body


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"request body is larger than the server's limit of {max_bytes} bytes", code="request_too_large")
