"""SGLang's native routes (used by lang's RuntimeEndpoint): POST /generate, POST /flush_cache, GET /get_server_info.

/generate takes the engine's arguments and answers its dicts:

    curl -s localhost:30000/generate -H 'Content-Type: application/json' \\
        -d '{"text": "Hello", "sampling_params": {"max_new_tokens": 8, "temperature": 0}}'

A batch (``text`` or ``input_ids`` as a list of prompts) answers a list; streamed, each chunk of a
batch carries its prompt's ``index``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sglite.runtime.server.body import read_json_body
from sglite.runtime.server.config import ServerConfig
from sglite.runtime.server.errors import APIError, invalid_request
from sglite.runtime.logprob_text import FLOOR_LOGPROB, with_logprob_texts
from sglite.runtime.prompts import prompt_batch
from sglite.runtime.server.protocol import GenerateRequest
from sglite.runtime.server.streaming import (
    Chunk,
    InflightRequests,
    SSEResponse,
    generate_all,
    merge_streams,
    new_request_id,
    open_streams,
    sse,
    sse_stream,
)


def sglite_version() -> str:
    from sglite import __version__

    return __version__


def json_safe(value: Any) -> Any:
    """Engine output with non-finite floats made JSON-legal (-inf logprob -> OpenAI's -9999 floor)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else math.copysign(-FLOOR_LOGPROB, value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class NativeServing:
    """SGLang's native routes over one shared engine."""

    def __init__(self, inflight: InflightRequests, config: ServerConfig, model_name: str) -> None:
        self.inflight = inflight
        self.config = config
        self.model_name = model_name

    async def flush_cache(self) -> Response:
        """Empty the radix cache; 409 while requests run (their KV is in use)."""
        if not await asyncio.to_thread(self.inflight.engine.flush_cache):
            raise APIError(409, "requests are in flight; flush the cache when the server is idle", code="engine_busy")
        return JSONResponse({"status": "flushed"})

    async def server_info(self) -> Response:
        """Model, context length, engine and server settings (never the API key), and live engine stats."""
        engine = self.inflight.engine
        engine_config = getattr(engine, "config", None)
        server = {k: v for k, v in dataclasses.asdict(self.config).items() if k != "api_key"}
        return JSONResponse(
            json_safe(
                {
                    "model_path": str(getattr(engine, "model_path", "")),
                    "served_model_name": self.model_name,
                    "context_length": engine.context_length,
                    "engine": dataclasses.asdict(engine_config) if dataclasses.is_dataclass(engine_config) else {},
                    "server": {**server, "auth": self.config.api_key is not None},
                    "stats": engine.get_stats(),
                    "version": sglite_version(),
                }
            )
        )

    async def generate(self, request: Request) -> Response:
        req = GenerateRequest.model_validate_json(await read_json_body(request, self.config.max_body_bytes))
        if (req.text is None) == (req.input_ids is None):
            raise invalid_request("give exactly one of 'text' or 'input_ids'", param="text")
        source: Any = req.text if req.text is not None else req.input_ids
        prompts, single = prompt_batch(source)
        if not prompts:
            raise invalid_request("the batch of prompts is empty", param="text" if req.text is not None else "input_ids")
        if len(prompts) > self.config.max_choices:
            raise invalid_request(f"a batch holds at most {self.config.max_choices} prompts, got {len(prompts)}", param="text")
        params = req.sampling_params if isinstance(req.sampling_params, list) else [req.sampling_params or {}] * len(prompts)
        if len(params) != len(prompts):
            raise invalid_request(f"got {len(params)} sampling_params for {len(prompts)} prompts", param="sampling_params")
        rids = [req.rid] if isinstance(req.rid, str) else req.rid or [new_request_id("gen") for _ in prompts]
        if len(rids) != len(prompts):
            raise invalid_request(f"got {len(rids)} rids for {len(prompts)} prompts", param="rid")
        calls = list(zip(prompts, params, rids))
        kwargs = {
            "return_logprob": req.return_logprob,
            "logprob_start_len": req.logprob_start_len,
            "top_logprobs_num": req.top_logprobs_num,
        }
        texts = req.return_text_in_logprobs
        if not req.stream:
            outputs = [self._with_texts(out, texts) for out in await generate_all(request, self.inflight, calls, **kwargs)]
            return JSONResponse(json_safe(outputs[0] if single else outputs))
        streams = await open_streams(self.inflight, calls, **kwargs)
        events = self._events(streams, rids, single, texts)
        return SSEResponse(sse_stream(events, on_exit=lambda: self.inflight.release(rids, abort=True)))

    def _with_texts(self, out: Chunk, texts: bool) -> Chunk:
        if not texts:
            return out
        decode = self.inflight.engine.tokenizer.decode
        return {**out, "meta_info": with_logprob_texts(out["meta_info"], lambda tid: decode([tid]))}

    async def _events(
        self, streams: list[AsyncIterator[Chunk]], rids: list[str], single: bool, texts: bool
    ) -> AsyncGenerator[str, None]:
        async for index, chunk in merge_streams(streams):
            if chunk.get("finished"):
                self.inflight.release([rids[index]], abort=False)
            chunk = self._with_texts(chunk, texts)
            yield sse(json.dumps(json_safe(chunk if single else {**chunk, "index": index})))
