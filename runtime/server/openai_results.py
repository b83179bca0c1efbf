"""What engine results become in an OpenAI response: the finish reason, the usage, the JSON body.

Shared by the plain endpoints (``openai_api.py``) and tool calling (``tool_serving.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel
from starlette.responses import Response

from sglite.runtime.server.errors import APIError, request_failed
from sglite.runtime.server.protocol import PromptTokensDetails, Usage

Call = tuple[list[int], dict[str, Any], str]  # (prompt ids, sampling params, rid)


def finish_reason(meta_info: dict[str, Any]) -> str:
    """OpenAI's ``finish_reason``; an abort not caused by this client means the server is going away.

    A failed request is answered with a generic message and its id; the engine's own text (which may
    name internals) goes to the server log only.
    """
    if meta_info.get("error_type") == "EngineShutdownError":
        raise APIError(503, "the request was aborted because the server is shutting down", code="aborted")
    if meta_info.get("error"):
        raise request_failed(meta_info.get("id", "?"), meta_info["error"])
    reason = (meta_info.get("finish_reason") or {}).get("type")
    if reason == "abort":
        raise APIError(503, "the request was aborted because the server is shutting down", code="aborted")
    return "length" if reason == "length" else "stop"


def usage_of(meta_infos: Sequence[dict[str, Any]], n: int) -> Usage:
    """Usage over ``n`` choices per prompt: each prompt counted once, every completion token counted."""
    prompt = sum(m["prompt_tokens"] for m in meta_infos[::n])
    cached = sum(max(m.get("cached_tokens", 0) for m in meta_infos[i : i + n]) for i in range(0, len(meta_infos), n))
    completion = sum(m["completion_tokens"] for m in meta_infos)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


def json_response(model: BaseModel) -> Response:
    """Serialize with pydantic-core (faster than ``json.dumps`` of ``model_dump()``)."""
    return Response(model.model_dump_json(), media_type="application/json")
