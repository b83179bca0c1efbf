"""``POST /v1/embeddings`` (OpenAI's shape) and SGLang's ``POST /encode`` over the engine's ``async_encode``.

The engine is an embedding-only one (an encoder folder, ``--is-embedding``) or a generator started with
``--embedding-model PATH``; a generator without one answers 400 saying so. Every error is raised before
any forward runs, so a bad request changes nothing.

    >>> EmbeddingRequest.model_validate({"input": ["a", "b"], "encoding_format": "base64"}).inputs()
    ['a', 'b']
"""

from __future__ import annotations

import base64
import json
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sglite.runtime.engine import EngineShutdownError
from sglite.runtime.server.body import read_json_body
from sglite.runtime.server.config import ServerConfig
from sglite.runtime.server.errors import APIError, invalid_request
from sglite.runtime.server.streaming import AsyncEngine, shutting_down_error

TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
MAX_INPUTS = 2048
"""Most inputs one request may hold (OpenAI's limit)."""


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request, plus vLLM/SGLang's ``truncate_prompt_tokens``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    input: str | list[str] | list[TokenId] | list[list[TokenId]]
    """One text, a list of texts, one list of token ids, or a list of those."""
    model: str | None = None
    """Accepted and echoed as the served model's name."""
    encoding_format: Literal["float", "base64"] = "float"
    """``base64``: each vector as the base64 of its little-endian float32 bytes (what the openai SDK asks for)."""
    dimensions: int | None = Field(None, ge=1)
    """Cut each vector to its first ``dimensions`` components (Matryoshka models only), re-normalised."""
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    """Cut longer inputs to this many tokens (-1: the model's maximum) instead of refusing them."""
    user: str | None = None
    """Metadata only."""

    def inputs(self) -> list[str] | list[list[int]]:
        """The inputs as a batch (a single text or token list becomes a batch of one)."""
        given = self.input
        if isinstance(given, str) or (given and isinstance(given[0], int)):
            return [given]
        return list(given)


def encoded_vector(vector: list[float], encoding_format: str) -> list[float] | str:
    """The vector as OpenAI sends it: a float list, or base64 of little-endian float32 bytes.

        >>> encoded_vector([1.0], "base64")
        'AACAPw=='
    """
    if encoding_format == "float":
        return vector
    import numpy as np

    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def encode_error(exc: Exception) -> APIError:
    """A 400 naming the field for the client's mistakes; re-raises anything else (a bug: a 500)."""
    if isinstance(exc, ValueError):
        return invalid_request(str(exc), param=getattr(exc, "param", "input"))
    raise exc


def generation_dependencies(engine: AsyncEngine) -> list[Any]:
    """Route dependencies for the OpenAI generation routes: on an embedding-only engine a 400 saying why,
    before a chat template or tokenizer of an encoder gets to fail in its own words."""
    if getattr(engine, "is_generation", True):
        return []

    async def refuse() -> None:
        try:
            await engine.async_generate("")
        except ValueError as exc:
            raise invalid_request(str(exc), code="not_a_generation_model") from exc

    return [Depends(refuse)]


class EmbeddingServing:
    """The embedding routes of one app."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig, model_name: str) -> None:
        self.engine = engine
        self.config = config
        self.model_name = model_name

    def register(self, app: FastAPI, dependencies: list[Any]) -> None:
        app.add_api_route("/v1/embeddings", self.embeddings, methods=["POST"], dependencies=dependencies)
        app.add_api_route("/encode", self.encode, methods=["POST"], dependencies=dependencies)

    async def _encode(self, inputs: list, dimensions: int | None = None, truncate_prompt_tokens: int | None = None) -> list[dict]:
        encode = getattr(self.engine, "async_encode", None)
        if encode is None:
            raise invalid_request("this server's engine cannot embed (replicated engines serve generation only)", param="input")
        if len(inputs) > MAX_INPUTS:
            raise invalid_request(f"input holds {len(inputs)} items; at most {MAX_INPUTS} per request", param="input")
        try:
            return await encode(inputs, dimensions, truncate_prompt_tokens)
        except EngineShutdownError as exc:
            raise shutting_down_error() from exc
        except ValueError as exc:
            raise encode_error(exc) from exc

    async def embeddings(self, request: Request) -> Response:
        req = EmbeddingRequest.model_validate_json(await read_json_body(request, self.config.max_body_bytes, self.config.body_timeout))
        results = await self._encode(req.inputs(), req.dimensions, req.truncate_prompt_tokens)
        prompt_tokens = sum(r["meta_info"]["prompt_tokens"] for r in results)
        body = {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": encoded_vector(r["embedding"], req.encoding_format)}
                for i, r in enumerate(results)
            ],
            "model": self.model_name,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
        return Response(json.dumps(body), media_type="application/json")

    async def encode(self, request: Request) -> Response:
        """SGLang's ``/encode``: ``{"text": ...}`` or ``{"input_ids": ...}`` (one or a batch) ->
        ``{"embedding", "meta_info"}`` (a list of those for a batch)."""
        try:
            body = json.loads(await read_json_body(request, self.config.max_body_bytes, self.config.body_timeout))
        except ValueError as exc:
            raise invalid_request(f"the body is not JSON: {exc}", code="invalid_json") from exc
        if not isinstance(body, dict) or ("text" in body) == ("input_ids" in body):
            raise invalid_request("give exactly one of 'text' (a string or list of strings) or 'input_ids'", param="text")
        field = "text" if "text" in body else "input_ids"
        unknown = sorted(set(body) - {field, "rid", "dimensions", "truncate_prompt_tokens"})
        if unknown:
            raise invalid_request(f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
        try:
            req = EmbeddingRequest.model_validate(
                {"input": body[field], **{k: body[k] for k in ("dimensions", "truncate_prompt_tokens") if k in body}}
            )
        except ValueError as exc:
            raise invalid_request(f"Invalid value for '{field}': give a string, a list of strings or token ids", param=field) from exc
        if field == "text" and not (isinstance(req.input, str) or all(isinstance(x, str) for x in req.input)):
            raise invalid_request("'text' must be a string or a list of strings; token ids go in 'input_ids'", param="text")
        results = await self._encode(req.inputs(), req.dimensions, req.truncate_prompt_tokens)
        single = isinstance(req.input, str) or bool(req.input and isinstance(req.input[0], int))
        return JSONResponse(results[0] if single else results)
