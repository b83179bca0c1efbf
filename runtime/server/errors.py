"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` for every failure.

Anything a client can send maps to a 4xx here; only a genuine server bug reaches the catch-all 500.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("sglite.server")

_TYPE_BY_STATUS = {
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
    503: "server_error",
}


class APIError(Exception):
    """An error answered to the client as ``status`` with an OpenAI error body.

        >>> error = APIError(400, "temperature must be <= 2", param="temperature")
        >>> error.status, error.error_type, error.param
        (400, 'invalid_request_error', 'temperature')
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 naming the offending field, e.g. for a ValueError raised by the engine's validation."""
    return APIError(400, message, param=param, code=code)


def request_failed(rid: str, detail: str) -> APIError:
    """A 500 for one engine request that failed: the detail is logged, the client gets the request id.

        >>> request_failed("req-1", "CUDA error: device-side assert").message
        'generation failed for request req-1; the server log has the details'
    """
    logger.error("request %s failed in the engine: %s", rid, detail)
    return APIError(500, f"generation failed for request {rid}; the server log has the details", code="generation_failed")


def internal_error(method: str, path: str) -> APIError:
    """The 500 for a server bug: an error id in the body, the traceback (logged by the caller) under that id."""
    error_id = uuid.uuid4().hex[:16]
    logger.exception("internal error %s while serving %s %s", error_id, method, path)
    return APIError(500, f"internal server error (id {error_id}); the server log has the details", code="internal_error")


def validation_error_to_api_error(errors: list[dict[str, Any]] | Any) -> APIError:
    """Turn pydantic/FastAPI validation errors into one 400 that names the bad field.

    FastAPI would answer 422 with its own shape; OpenAI clients expect 400 and ``error.message``.
    For a union field pydantic reports one error per member; the deepest one is the informative
    one, and among equals a broken constraint ("too short") says more than a type mismatch.
    """
    errors = list(errors)
    if not errors:
        return invalid_request("invalid request body")
    first = max(errors, key=lambda e: (len(e.get("loc", ())), not str(e.get("type", "")).endswith("_type")))
    param = ".".join(_field_path(first.get("loc", ()))) or None
    kind = first.get("type", "")
    detail = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        return invalid_request(f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    if kind.startswith("json_") or (kind == "model_type" and param is None):
        return invalid_request(f"Request body must be a JSON object: {detail}", code="invalid_json")
    if kind == "missing":
        return invalid_request(f"Missing required parameter: '{param}'", param=param, code="missing_parameter")
    message = f"Invalid value for '{param}': {detail}" if param else detail
    return invalid_request(message, param=param, code="invalid_value")


def _field_path(loc: tuple | list) -> list[str]:
    """Field names and list indices of a pydantic ``loc``, without "body" and union-member tags."""
    path = []
    for part in loc:
        if isinstance(part, int):
            path.append(str(part))
        elif part != "body" and not any(c in part for c in "[]-") and part not in _TYPE_TAGS:
            path.append(part)
    return path


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal", "model"}


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that give every error response the OpenAI shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error_to_api_error(exc.errors()).response()

    @app.exception_handler(ValidationError)
    async def _model_validation(_: Request, exc: ValidationError) -> JSONResponse:
        return validation_error_to_api_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # 404 for unknown paths, 405 for wrong methods: keep the status, use our body.
        headers = dict(exc.headers) if exc.headers else None
        return APIError(exc.status_code, str(exc.detail), headers=headers).response()

    # Unhandled exceptions are answered by app.CatchServerErrors (a middleware), not by a handler here:
    # Starlette re-raises after an Exception handler, which makes uvicorn drop the keep-alive connection.
