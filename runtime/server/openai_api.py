"""Handlers of /v1/chat/completions, /v1/completions and /v1/models over one shared engine.

Each choice of each prompt is its own engine request (its own rid), so the engine batches them with
everything else and any one can be aborted; all prompts are tokenized here, so prompt lengths are
known up front (context-length errors, echo, logprob text offsets).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from sglite.runtime.server.body import read_json_body
from sglite.runtime.server.config import ServerConfig
from sglite.runtime.server.errors import invalid_request
from sglite.runtime.input_processor import ContextLengthError, max_chars_per_token
from sglite.runtime.logprob_text import TokenStrings
from sglite.runtime.server.logprobs import chat_logprobs, completion_logprobs
from sglite.runtime.server.metrics import ServerMetrics
from sglite.runtime.server.openai_results import Call, finish_reason, json_response, usage_of
from sglite.runtime.server.protocol import (
    INT64_MAX,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
)
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
from sglite.runtime.server.tool_serving import ToolServing

LEGACY_DEFAULT_MAX_TOKENS = 16
"""OpenAI's default ``max_tokens`` for /v1/completions (chat defaults to the rest of the context)."""


async def off_loop(build: Callable[[ChoiceUpdate], str | None], update: ChoiceUpdate, heavy: bool) -> str | None:
    """``build(update)``, in a worker thread when ``heavy`` (logprob entries to render), so a big event
    never stalls the event loop that every other stream and ``/health`` share."""
    if not heavy:
        return build(update)
    return await run_in_threadpool(build, update)


@dataclass
class ChoiceUpdate:
    """What one engine chunk adds to one choice of a streamed response."""

    index: int
    first: bool
    """The choice's first update (echo and the prompt's logprobs go here)."""
    text: str
    token_logprobs: list[Any]
    """Output logprob entries new since the previous update (engine chunks carry deltas)."""
    top_logprobs: list[Any]
    meta_info: dict[str, Any]
    finish_reason: str | None
    """Set on the choice's last update only."""


class OpenAIServing:
    """The OpenAI-compatible endpoints; one instance per app."""

    def __init__(
        self, inflight: InflightRequests, config: ServerConfig, metrics: ServerMetrics, model_name: str
    ) -> None:
        self.inflight = inflight
        self.engine = inflight.engine
        self.config = config
        self.metrics = metrics
        self.model_name = model_name
        self.strings = TokenStrings(self.engine.tokenizer)
        self.max_chars_per_token = max_chars_per_token(self.engine.tokenizer)
        self.tools = ToolServing(inflight, metrics, model_name, self._calls)

    # ---- /v1/models ---------------------------------------------------------------------
    async def list_models(self) -> Response:
        card = ModelCard(id=self.model_name, max_model_len=self.engine.context_length)
        return json_response(ModelList(data=[card]))

    # ---- shared -------------------------------------------------------------------------
    def _check_choices(self, n_prompts: int, n: int) -> None:
        if n_prompts * n > self.config.max_choices:
            raise invalid_request(
                f"{n_prompts} prompt(s) x n={n} is more than this server's limit of {self.config.max_choices} choices",
                param="n",
            )

    def _calls(
        self, prompts: list[list[int]], req: ChatCompletionRequest | CompletionRequest, max_tokens: int | None, prompt_param: str
    ) -> list[Call]:
        """One engine request per choice per prompt, after the checks that need the prompt's length."""
        self._check_choices(len(prompts), req.n)
        calls = []
        context = self.engine.context_length
        for ids in prompts:
            if not ids:
                raise invalid_request("prompt is empty: give at least one token", param="prompt")
            if len(ids) >= context or (max_tokens is not None and len(ids) + max_tokens > context):
                error = ContextLengthError(context, len(ids), max(max_tokens or 1, 1))
                raise invalid_request(str(error), param=prompt_param, code="context_length_exceeded")
            params = req.sampling_params(max_tokens if max_tokens is not None else context - len(ids))
            for choice in range(req.n):
                choice_params = dict(params)
                if "seed" in params and choice:
                    # Same seed for every choice would make n identical samples.
                    choice_params["seed"] = (params["seed"] + choice) % (INT64_MAX + 1)
                calls.append((ids, choice_params, new_request_id("req")))
        return calls

    async def _updates(
        self, calls: list[Call], streams: list[AsyncIterator[Chunk]], arrival: float, finals: dict[int, dict[str, Any]]
    ) -> AsyncGenerator[ChoiceUpdate, None]:
        """The engine chunks of all choices, in arrival order, as per-choice updates.

        Records TTFT and inter-token latency, releases finished requests, and fills ``finals``
        with each choice's last meta_info (for the usage chunk).
        """
        last_token_time: dict[int, float] = {}
        started: set[int] = set()
        async for index, chunk in merge_streams(streams):
            now = time.perf_counter()
            meta = chunk["meta_info"]
            new_tokens = len(chunk["output_ids"])
            if new_tokens:
                if index not in last_token_time:
                    self.metrics.ttft.observe(now - arrival)
                else:
                    gap = (now - last_token_time[index]) / new_tokens  # a jump-forward chunk carries several
                    for _ in range(new_tokens):
                        self.metrics.inter_token_latency.observe(gap)
                last_token_time[index] = now
            reason = None
            if chunk["finished"]:
                self.inflight.release([calls[index][2]], abort=False)
                finals[index] = meta
                reason = finish_reason(meta)
                self.metrics.e2e_latency.observe(now - arrival)
            first = index not in started
            started.add(index)
            yield ChoiceUpdate(
                index=index,
                first=first,
                text=chunk["text"],
                token_logprobs=meta.get("output_token_logprobs") or [],
                top_logprobs=meta.get("output_top_logprobs") or [],
                meta_info=meta,
                finish_reason=reason,
            )

    def _sse(self, events: AsyncGenerator[str, None], calls: list[Call]) -> SSEResponse:
        rids = [rid for _, _, rid in calls]
        # On any exit, abort the choices still running (the client left, or the stream failed).
        return SSEResponse(sse_stream(events, on_exit=lambda: self.inflight.release(rids, abort=True)))

    def _check_length(self, characters: int, param: str) -> None:
        """A 400 for text that cannot fit the context, before it costs a tokenization (cheap bound)."""
        context = self.engine.context_length
        if characters > context * self.max_chars_per_token:
            raise invalid_request(
                f"{param} is {characters} characters, necessarily over this model's maximum context length of {context} "
                f"tokens (no token covers more than {self.max_chars_per_token} characters)",
                param=param,
                code="context_length_exceeded",
            )

    # ---- /v1/chat/completions -----------------------------------------------------------
    def _chat_prompt_ids(self, messages: list[ChatMessage]) -> list[int]:
        from jinja2 import TemplateError

        conversation = [m.for_template() for m in messages]
        try:
            ids = self.engine.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=False)
        except (TemplateError, ValueError) as exc:
            raise invalid_request(f"the model's chat template rejected these messages: {exc}", param="messages") from exc
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    async def chat_completions(self, request: Request) -> Response:
        arrival = time.perf_counter()
        req = ChatCompletionRequest.model_validate_json(await read_json_body(request, self.config.max_body_bytes, self.config.body_timeout))
        if req.top_logprobs and not req.logprobs:
            raise invalid_request("top_logprobs requires logprobs=true", param="top_logprobs")
        if req.tools:  # tool calling: see tool_serving.py
            return await self.tools.chat(request, req, arrival)
        if req.tool_choice not in (None, "none", "auto"):
            raise invalid_request("tool_choice requires tools", param="tool_choice")
        try:
            constraint = req.constraint()
        except ValueError as exc:
            raise invalid_request(str(exc), param="response_format") from exc
        self._check_length(sum(len(m.text()) for m in req.messages), "messages")
        prompt_ids = await asyncio.to_thread(self._chat_prompt_ids, req.messages)
        calls = self._calls([prompt_ids], req, req.max_new_tokens(), "messages")
        for _, params, _ in calls:
            params.update(constraint)
        kwargs = {"return_logprob": True, "top_logprobs_num": req.top_logprobs or 0} if req.logprobs else {}
        response_id = new_request_id("chatcmpl")
        if req.stream:
            streams = await open_streams(self.inflight, calls, **kwargs)
            return self._sse(self._chat_events(req, calls, streams, response_id, arrival), calls)
        outputs = await generate_all(request, self.inflight, calls, **kwargs)
        choices = []
        for index, out in enumerate(outputs):
            meta = out["meta_info"]
            logprobs = (
                chat_logprobs(self.strings, meta.get("output_token_logprobs", []), meta.get("output_top_logprobs"))
                if req.logprobs
                else None
            )
            choices.append(
                ChatChoice(index=index, message=AssistantMessage(content=out["text"]), logprobs=logprobs,
                           finish_reason=finish_reason(meta), schema_valid=meta.get("schema_valid"),
                           schema_error=meta.get("schema_error"))
            )
            self.metrics.e2e_latency.observe(time.perf_counter() - arrival)
        usage = usage_of([out["meta_info"] for out in outputs], req.n)
        return json_response(ChatCompletionResponse(id=response_id, model=self.model_name, choices=choices, usage=usage))

    async def _chat_events(
        self, req: ChatCompletionRequest, calls: list[Call], streams: list[AsyncIterator[Chunk]], response_id: str, arrival: float
    ) -> AsyncGenerator[str, None]:
        created = int(time.time())

        def event(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            chunk = ChatCompletionChunk(id=response_id, created=created, model=self.model_name, choices=choices, usage=usage)
            return sse(chunk.model_dump_json())

        def update_event(update: ChoiceUpdate) -> str | None:
            logprobs = None
            if req.logprobs and update.token_logprobs:
                logprobs = chat_logprobs(self.strings, update.token_logprobs, update.top_logprobs)
            if update.text or logprobs is not None or update.finish_reason is not None:
                delta = ChatDelta(content=update.text) if update.text else ChatDelta()
                verdict = ({"schema_valid": update.meta_info.get("schema_valid"),
                            "schema_error": update.meta_info.get("schema_error")} if update.finish_reason else {})
                return event([ChatChunkChoice(index=update.index, delta=delta, logprobs=logprobs,
                                              finish_reason=update.finish_reason, **verdict)])
            return None

        for index in range(len(calls)):
            yield event([ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))])
        finals: dict[int, dict[str, Any]] = {}
        async for update in self._updates(calls, streams, arrival, finals):
            payload = await off_loop(update_event, update, heavy=bool(req.logprobs))
            if payload is not None:
                yield payload
        if req.include_usage_chunk:
            yield event([], usage_of([finals[i] for i in range(len(calls))], req.n))

    # ---- /v1/completions ----------------------------------------------------------------
    def _completion_prompt_ids(self, prompts: list[str] | list[list[int]]) -> list[list[int]]:
        # The engine tokenizes strings the same way (tokenizer.encode); doing it here gives the lengths up front.
        return [self.engine.tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]

    def _prompt_text(self, prompt: str | list[int]) -> str:
        return prompt if isinstance(prompt, str) else self.engine.tokenizer.decode(prompt)

    async def completions(self, request: Request) -> Response:
        arrival = time.perf_counter()
        req = CompletionRequest.model_validate_json(await read_json_body(request, self.config.max_body_bytes, self.config.body_timeout))
        prompts = req.prompts()
        self._check_choices(len(prompts), req.n)  # before tokenizing a huge batch
        for prompt in prompts:
            if isinstance(prompt, str):
                self._check_length(len(prompt), "prompt")
        prompt_ids = await asyncio.to_thread(self._completion_prompt_ids, prompts)
        max_tokens = req.max_tokens if req.max_tokens is not None else LEGACY_DEFAULT_MAX_TOKENS
        calls = self._calls(prompt_ids, req, max_tokens, "prompt")
        kwargs: dict[str, Any] = {}
        if req.logprobs is not None:
            kwargs = {"return_logprob": True, "top_logprobs_num": req.logprobs, "logprob_start_len": 0 if req.echo else -1}
        prompt_texts = [self._prompt_text(p) for p in prompts] if req.echo or req.logprobs is not None else [""] * len(prompts)
        response_id = new_request_id("cmpl")
        if req.stream:
            streams = await open_streams(self.inflight, calls, **kwargs)
            return self._sse(self._completion_events(req, calls, streams, prompt_texts, response_id, arrival), calls)
        outputs = await generate_all(request, self.inflight, calls, **kwargs)
        choices = []
        for index, out in enumerate(outputs):
            meta = out["meta_info"]
            prompt_text = prompt_texts[index // req.n]
            logprobs = None
            if req.logprobs is not None:
                offset = 0 if req.echo else len(prompt_text)
                logprobs, _ = self._legacy_logprobs(
                    meta, meta.get("output_token_logprobs", []), meta.get("output_top_logprobs", []), req.echo, offset
                )
            text = (prompt_text if req.echo else "") + out["text"]
            choices.append(CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish_reason(meta)))
            self.metrics.e2e_latency.observe(time.perf_counter() - arrival)
        usage = usage_of([out["meta_info"] for out in outputs], req.n)
        return json_response(CompletionResponse(id=response_id, model=self.model_name, choices=choices, usage=usage))

    def _legacy_logprobs(
        self, meta: dict[str, Any], token_logprobs: list[Any], top_logprobs: list[Any], with_prompt: bool, offset: int
    ) -> tuple[CompletionLogprobs, int]:
        """Legacy logprobs of these output entries (preceded by the prompt's when echoing); and the next offset."""
        entries, tops = list(token_logprobs), list(top_logprobs) or [None] * len(token_logprobs)
        if with_prompt:
            prompt_entries = list(meta.get("input_token_logprobs", []))
            entries, tops = prompt_entries + entries, [None] * len(prompt_entries) + tops
        return completion_logprobs(self.strings, entries, tops, offset)

    async def _completion_events(
        self,
        req: CompletionRequest,
        calls: list[Call],
        streams: list[AsyncIterator[Chunk]],
        prompt_texts: list[str],
        response_id: str,
        arrival: float,
    ) -> AsyncGenerator[str, None]:
        created = int(time.time())

        def event(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
            chunk = CompletionResponse(id=response_id, created=created, model=self.model_name, choices=choices, usage=usage)
            return sse(chunk.model_dump_json())

        offsets: dict[int, int] = {}  # per choice: text offset of its next logprob token

        def update_event(update: ChoiceUpdate) -> str | None:
            prompt_text = prompt_texts[update.index // req.n]
            echo = req.echo and update.first
            text = (prompt_text if echo else "") + update.text
            logprobs = None
            if req.logprobs is not None:
                if update.first:
                    offsets[update.index] = 0 if req.echo else len(prompt_text)
                logprobs, offsets[update.index] = self._legacy_logprobs(
                    update.meta_info, update.token_logprobs, update.top_logprobs, echo, offsets[update.index]
                )
            if text or (logprobs is not None and logprobs.tokens) or update.finish_reason is not None:
                return event([CompletionChoice(index=update.index, text=text, logprobs=logprobs, finish_reason=update.finish_reason)])
            return None

        finals: dict[int, dict[str, Any]] = {}
        async for update in self._updates(calls, streams, arrival, finals):
            payload = await off_loop(update_event, update, heavy=req.logprobs is not None or req.echo)
            if payload is not None:
                yield payload
        if req.include_usage_chunk:
            yield event([], usage_of([finals[i] for i in range(len(calls))], req.n))
