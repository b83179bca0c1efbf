"""SGLang's native routes, wire-compatible with SGLang 0.5.x (what ``sgl.RuntimeEndpoint`` speaks).

    POST /generate                       text or input_ids (one or a batch), sampling_params, logprob options
    GET  /model_info, /get_model_info    model_path (SGLang's client picks its chat template from it)
    GET  /server_info, /get_server_info  engine and server settings, live stats, version
    GET|POST /flush_cache                empty the radix cache (refused while requests run)
    GET  /health_generate                200 once the engine decodes a token
    POST /concate_and_append_request     accepted: a join's splice is done by the radix cache

    curl -s localhost:30000/generate -H 'Content-Type: application/json' \\
        -d '{"text": "Hello", "sampling_params": {"max_new_tokens": 8, "temperature": 0}}'

A streamed ``/generate`` sends SGLang's events: ``text`` and ``output_ids`` hold *everything so far*
(SGLang's client slices ``text[pos:]``; with ``--incremental-streaming-output``, as in SGLang, only
what is new in the event, so long streams grow linearly), ``meta_info`` the request's counters with the logprob lists
holding only the entries new in this event and ``output_token_logprobs_length`` the running count.
A batch (several prompts, or ``n`` > 1) answers a list; each streamed event then carries ``index``
(prompt-major: prompt ``i``'s sample ``j`` is ``i * n + j``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sglite.runtime.server.body import read_json_body
from sglite.runtime.server.config import ServerConfig
from sglite.runtime.server.errors import APIError, invalid_request, request_failed
from sglite.runtime.logprob_text import FLOOR_LOGPROB, with_logprob_texts
from sglite.runtime.prompts import prompt_batch
from sglite.runtime.native_stream import StreamState, sglang_meta_info
from sglite.runtime.server.native_protocol import GenerateRequest
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

Call = tuple[str | list[int], dict[str, Any], str]  # (prompt, sampling params, rid)


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

    def register(self, app: FastAPI, dependencies: list[Any]) -> None:
        """Add the native routes to ``app`` behind ``dependencies`` (the API key / rate-limit guard)."""
        app.add_api_route("/generate", self.generate, methods=["POST"], dependencies=dependencies)
        app.add_api_route("/flush_cache", self.flush_cache, methods=["GET", "POST"], dependencies=dependencies)
        for path in ("/server_info", "/get_server_info"):
            app.add_api_route(path, self.server_info, methods=["GET"], dependencies=dependencies)
        for path in ("/model_info", "/get_model_info"):
            app.add_api_route(path, self.model_info, methods=["GET"], dependencies=dependencies)
        app.add_api_route("/health_generate", self.health_generate, methods=["GET"], dependencies=dependencies)
        app.add_api_route("/concate_and_append_request", self.concate_and_append, methods=["POST"], dependencies=dependencies)

    async def concate_and_append(self, request: Request) -> Response:
        """SGLang's client calls this after ``join("concate_and_append")`` to splice the forks' KV into the
        parent's. Here the parent's next ``/generate`` sends the joined text, whose prefixes the radix
        cache already holds: the splice happens there, exactly (the forks' KV sits at the positions the
        joined text gives it only up to the fork point; what follows is computed, not position-shifted)."""
        try:
            body = json.loads(await read_json_body(request, self.config.max_body_bytes, self.config.body_timeout))
        except ValueError as exc:
            raise invalid_request(f"the body is not JSON: {exc}", code="invalid_json") from exc
        src, dst = (body.get("src_rids"), body.get("dst_rid")) if isinstance(body, dict) else (None, None)
        if not (isinstance(src, list) and all(isinstance(r, str) for r in src) and isinstance(dst, str)):
            raise invalid_request("give 'src_rids' (a list of strings) and 'dst_rid' (a string)", param="src_rids")
        return JSONResponse({"success": True})

    async def flush_cache(self) -> Response:
        """Empty the radix cache; 409 while requests run (their KV is in use)."""
        if not await asyncio.to_thread(self.inflight.engine.flush_cache):
            raise APIError(409, "requests are in flight; flush the cache when the server is idle", code="engine_busy")
        return JSONResponse({"status": "flushed"})

    async def model_info(self) -> Response:
        """SGLang's ``/model_info``: ``model_path`` (its client picks a chat template from it) and the architecture."""
        engine = self.inflight.engine
        hf_config = getattr(engine, "model_config", None)
        model_path = str(getattr(engine, "model_path", "") or self.model_name)
        return JSONResponse(
            {
                "model_path": model_path,
                "served_model_name": self.model_name,
                "tokenizer_path": model_path,
                "is_generation": getattr(engine, "is_generation", True),
                "preferred_sampling_params": None,
                "weight_version": "default",
                "has_image_understanding": False,
                "has_audio_understanding": False,
                "model_type": getattr(hf_config, "model_type", None),
                "architectures": getattr(hf_config, "architectures", None),
                "context_length": engine.context_length,
            }
        )

    async def server_info(self) -> Response:
        """Model, context length, engine and server settings (never the API key), and live engine stats."""
        engine = self.inflight.engine
        engine_config = getattr(engine, "config", None)
        server = {k: v for k, v in dataclasses.asdict(self.config).items() if k != "api_key"}
        engine_options = dataclasses.asdict(engine_config) if dataclasses.is_dataclass(engine_config) else {}
        stats = engine.get_stats()
        return JSONResponse(
            json_safe(
                {
                    "model_path": str(getattr(engine, "model_path", "")),
                    "served_model_name": self.model_name,
                    "context_length": engine.context_length,
                    # SGLang's ServerArgs names for the settings that have a counterpart here
                    **{k: engine_options[k] for k in ("chunked_prefill_size", "schedule_policy", "disable_radix_cache",
                                                      "random_seed", "max_running_requests", "max_total_tokens") if k in engine_options},
                    "engine": engine_options,
                    "server": {**server, "auth": self.config.api_key is not None},
                    "stats": stats,
                    "internal_states": [stats],
                    "version": sglite_version(),
                }
            )
        )

    async def health_generate(self) -> Response:
        """200 once the engine has decoded one token (SGLang's ``/health_generate``)."""
        rid = new_request_id("health")
        self.inflight.add([rid])
        try:
            await self.inflight.engine.async_generate(input_ids=[0], sampling_params={"max_new_tokens": 1, "temperature": 0}, rid=rid)
        except Exception as exc:  # anything but a token means unhealthy
            raise APIError(503, f"the engine did not decode a token: {type(exc).__name__}", code="unhealthy") from exc
        finally:
            self.inflight.release([rid], abort=True)
        return Response(status_code=200)

    async def generate(self, request: Request) -> Response:
        req = GenerateRequest.model_validate_json(await read_json_body(request, self.config.max_body_bytes, self.config.body_timeout))
        if (req.text is None) == (req.input_ids is None):
            raise invalid_request("give exactly one of 'text' or 'input_ids'", param="text")
        source: Any = req.text if req.text is not None else req.input_ids
        prompts, single = prompt_batch(source)
        if not prompts:
            raise invalid_request("the batch of prompts is empty", param="text" if req.text is not None else "input_ids")
        params = req.sampling_params if isinstance(req.sampling_params, list) else [req.sampling_params or {}] * len(prompts)
        if len(params) != len(prompts):
            raise invalid_request(f"got {len(params)} sampling_params for {len(prompts)} prompts", param="sampling_params")
        samples = [_sample_count(p) for p in params]
        if sum(samples) > self.config.max_choices:
            raise invalid_request(
                f"a request holds at most {self.config.max_choices} completions (prompts x n), got {sum(samples)}", param="text"
            )
        rids = [req.rid] if isinstance(req.rid, str) else req.rid or [new_request_id("gen") for _ in prompts]
        if len(rids) != len(prompts):
            raise invalid_request(f"got {len(rids)} rids for {len(prompts)} prompts", param="rid")
        kwargs = {
            "return_logprob": bool(req.return_logprob),
            "logprob_start_len": -1 if req.logprob_start_len is None else req.logprob_start_len,
            "top_logprobs_num": req.top_logprobs_num or 0,
        }
        texts = req.return_text_in_logprobs
        many = not single or samples[0] > 1
        if not req.stream:
            # n > 1 goes to the engine whole: it prefills the prompt once and forks the samples.
            results = await generate_all(request, self.inflight, list(zip(prompts, params, rids)), **kwargs)
            flat = [out for result in results for out in (result if isinstance(result, list) else [result])]
            outputs = [self._finish_output(out, texts) for out in flat]
            return JSONResponse(json_safe(outputs if many else outputs[0]))
        calls = await self._stream_calls(prompts, params, rids, samples)
        streams = await open_streams(self.inflight, calls, **kwargs)
        call_rids = [rid for _, _, rid in calls]
        events = self._events(streams, call_rids, many, texts)
        return SSEResponse(sse_stream(events, on_exit=lambda: self.inflight.release(call_rids, abort=True)))

    async def _stream_calls(
        self, prompts: list[Any], params: list[dict[str, Any]], rids: list[str], samples: list[int]
    ) -> list[Call]:
        """One engine stream per sample; a prompt with ``n`` > 1 is prefilled once first (so the samples
        start from its cached KV), as SGLang does."""
        calls: list[Call] = []
        for prompt, sampling, rid, n in zip(prompts, params, rids, samples):
            if n == 1:
                calls.append((prompt, sampling, rid))
                continue
            await self._prefill(prompt)
            single = {k: v for k, v in sampling.items() if k != "n"}
            seed = single.get("seed", single.get("sampling_seed"))
            for index in range(n):
                sample = dict(single)
                if seed is not None and isinstance(seed, int) and index:
                    sample.pop("sampling_seed", None)
                    sample["seed"] = (seed + index) % 2**63  # as the engine seeds its parallel samples
                calls.append((prompt, sample, rid if index == 0 else f"{rid}-{index}"))
        return calls

    async def _prefill(self, prompt: str | list[int]) -> None:
        rid = new_request_id("prefill")
        self.inflight.add([rid])
        try:
            argument = {"input_ids": prompt} if isinstance(prompt, list) else {"prompt": prompt}
            await self.inflight.engine.async_generate(**argument, sampling_params={"max_new_tokens": 0}, rid=rid)
        except ValueError as exc:
            raise invalid_request(str(exc)) from exc
        finally:
            self.inflight.release([rid], abort=True)

    def _finish_output(self, out: Chunk, texts: bool) -> Chunk:
        out = {**out, "meta_info": sglang_meta_info(out["meta_info"])}
        return self._with_texts(out, texts)

    def _with_texts(self, out: Chunk, texts: bool) -> Chunk:
        if not texts:
            return out
        decode = self.inflight.engine.tokenizer.decode
        return {**out, "meta_info": with_logprob_texts(out["meta_info"], lambda tid: decode([tid]))}

    async def _events(
        self, streams: list[AsyncIterator[Chunk]], rids: list[str], many: bool, texts: bool
    ) -> AsyncGenerator[str, None]:
        states = [StreamState(self.config.incremental_streaming_output) for _ in streams]
        async for index, chunk in merge_streams(streams):
            if chunk.get("finished"):
                self.inflight.release([rids[index]], abort=False)
                error = chunk["meta_info"].get("error")
                if error:  # the detail goes to the log; the client gets the request id
                    if chunk["meta_info"].get("error_type") == "EngineShutdownError":
                        raise APIError(503, "the request was aborted because the server is shutting down", code="aborted")
                    raise request_failed(rids[index], error)
            event = self._with_texts(states[index].event(chunk), texts)
            if many:
                event["index"] = index
            yield sse(json.dumps(json_safe(event)))


def _sample_count(params: Any) -> int:
    """``n`` of one prompt's sampling params (validated by the engine; a bad value counts as 1 here)."""
    n = params.get("n", 1) if isinstance(params, dict) else 1
    return n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 128 else 1
