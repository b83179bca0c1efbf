"""/v1/chat/completions requests with ``tools``: prompt, constrained calls, and the OpenAI response shapes.

See ``tools.py`` for the formats and why a returned call always matches its function's schema. A
streamed tool response is generated whole and then sent as OpenAI's chunks (role, content, one
``tool_calls`` delta carrying the complete arguments, finish), which every OpenAI client assembles.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from sglite.runtime.server.errors import invalid_request
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
    Usage,
)
from sglite.runtime.server.streaming import SSE_DONE, InflightRequests, generate_all, new_request_id, sse
from sglite.runtime.server.tools import (
    ToolFormat,
    call_schema,
    chosen_functions,
    functions_of,
    parse_call,
    render_conversation,
    template_supports_tools,
    tool_format,
)

class ToolServing:
    """Chat completions that offer tools; one per app, next to ``OpenAIServing``."""

    def __init__(
        self,
        inflight: InflightRequests,
        metrics: ServerMetrics,
        model_name: str,
        calls: Callable[[list[list[int]], ChatCompletionRequest, int | None, str], list[Call]],
    ) -> None:
        """``calls(prompts, req, max_tokens, prompt_param)``: the engine requests of a chat request, one per
        choice, after the checks every chat request gets (``OpenAIServing._calls``)."""
        self.inflight = inflight
        self.engine = inflight.engine
        self.metrics = metrics
        self.model_name = model_name
        self.calls = calls
        template = getattr(self.engine.tokenizer, "chat_template", None)
        self.native = template_supports_tools(template)
        self.format: ToolFormat = tool_format(template)

    def _prompt_ids(self, req: ChatCompletionRequest, functions: list[dict[str, Any]]) -> list[int]:
        from jinja2 import TemplateError

        conversation = render_conversation([m.for_template() for m in req.messages], functions, self.format, self.native)
        kwargs = {"tools": [{"type": "function", "function": f} for f in functions]} if self.native else {}
        try:
            ids = self.engine.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=True, return_dict=False, **kwargs
            )
        except (TemplateError, ValueError, TypeError) as exc:
            raise invalid_request(f"the model's chat template rejected these messages: {exc}", param="messages") from exc
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    async def chat(self, request: Request, req: ChatCompletionRequest, arrival: float) -> Response:
        if req.response_format is not None and req.response_format.type != "text":
            raise invalid_request("response_format cannot be combined with tools; the call's schema is the constraint", param="response_format")
        if req.logprobs:
            raise invalid_request("logprobs are not returned for requests with tools", param="logprobs")
        functions = functions_of([t.model_dump(exclude_none=True) for t in req.tools or []])
        choice = req.tool_choice if req.tool_choice is not None else "auto"
        try:
            targets = chosen_functions(functions, choice.model_dump() if hasattr(choice, "model_dump") else choice)
        except ValueError as exc:
            raise invalid_request(str(exc), param="tool_choice") from exc
        prompt_ids = await asyncio.to_thread(self._prompt_ids, req, functions)
        base = self.calls([prompt_ids], req, req.max_new_tokens(), "messages")
        mode = "none" if choice == "none" else "auto" if choice == "auto" else "call"
        results = []
        for index, (_, params, _) in enumerate(base):
            results.append(await self._one_choice(request, prompt_ids, params, targets, mode, index))
        response_id = new_request_id("chatcmpl")
        usage = usage_of([{"prompt_tokens": len(prompt_ids), **r} for r in results], len(results))
        self.metrics.e2e_latency.observe(time.perf_counter() - arrival)
        if req.stream:
            from sglite.runtime.server.streaming import SSEResponse

            return SSEResponse(self._events(req, results, response_id, usage))
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=r["content"], tool_calls=r["tool_calls"]),
                logprobs=None,
                finish_reason=r["finish_reason"],
            )
            for i, r in enumerate(results)
        ]
        return json_response(ChatCompletionResponse(id=response_id, model=self.model_name, choices=choices, usage=usage))

    async def _generate(self, request: Request, prompt_ids: list[int], params: dict[str, Any]) -> dict[str, Any]:
        [out] = await generate_all(request, self.inflight, [(prompt_ids, params, new_request_id("tool"))])
        finish_reason(out["meta_info"])  # raises on an engine error or a shutdown abort
        return out

    async def _one_choice(
        self, request: Request, prompt_ids: list[int], params: dict[str, Any], targets: list[dict[str, Any]], mode: str, index: int
    ) -> dict[str, Any]:
        """One choice: free text, or a call constrained to ``targets`` (after free text in ``auto``)."""
        fmt = self.format
        budget = params.get("max_new_tokens")
        content, completion, cached = "", 0, 0
        if mode in ("none", "auto"):
            first = dict(params)
            if mode == "auto":
                first["stop"] = list(first.get("stop") or []) + [fmt.marker]
            out = await self._generate(request, prompt_ids, first)
            meta = out["meta_info"]
            content, completion, cached = out["text"], meta["completion_tokens"], meta["cached_tokens"]
            reason = (meta.get("finish_reason") or {})
            if mode == "none" or reason.get("matched") != fmt.marker:
                return self._result(content, None, "length" if reason.get("type") == "length" else "stop", completion, cached)
        # the call: the text so far, the format's opening, then JSON under the call's schema
        opening = "<tool_call>\n" if fmt.name == "hermes" else ""
        tokenizer = self.engine.tokenizer
        call_prompt = prompt_ids + tokenizer.encode(content + opening, add_special_tokens=False) if (content or opening) else prompt_ids
        call_params = {k: v for k, v in params.items() if k not in ("stop", "stop_token_ids", "min_new_tokens")}
        call_params["json_schema"] = call_schema(targets, fmt)
        if budget is not None:
            call_params["max_new_tokens"] = max(1, budget - completion)
        if "seed" in call_params:
            call_params["seed"] = (call_params["seed"] + 7919 * (index + 1)) % (INT64_MAX + 1)
        out = await self._generate(request, call_prompt, call_params)
        meta = out["meta_info"]
        completion += meta["completion_tokens"]
        if (meta.get("finish_reason") or {}).get("type") == "length":
            # out of tokens mid-call: the JSON is incomplete, so no call is returned (OpenAI does the same)
            return self._result(content + opening + out["text"], None, "length", completion, cached)
        return self._result(content or None, [parse_call(out["text"], fmt)], "tool_calls", completion, max(cached, meta["cached_tokens"]))

    @staticmethod
    def _result(content: str | None, calls: list[dict[str, Any]] | None, reason: str, completion: int, cached: int) -> dict[str, Any]:
        return {"content": content, "tool_calls": calls, "finish_reason": reason, "completion_tokens": completion, "cached_tokens": cached}

    async def _events(
        self, req: ChatCompletionRequest, results: list[dict[str, Any]], response_id: str, usage: Usage
    ) -> AsyncGenerator[str, None]:
        created = int(time.time())

        def event(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            chunk = ChatCompletionChunk(id=response_id, created=created, model=self.model_name, choices=choices, usage=usage)
            return sse(chunk.model_dump_json())

        for index, result in enumerate(results):
            yield event([ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))])
            if result["content"]:
                yield event([ChatChunkChoice(index=index, delta=ChatDelta(content=result["content"]))])
            if result["tool_calls"]:
                calls = [{"index": i, **call} for i, call in enumerate(result["tool_calls"])]
                yield event([ChatChunkChoice(index=index, delta=ChatDelta(tool_calls=calls))])
            yield event([ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=result["finish_reason"])])
        if req.include_usage_chunk:
            yield event([], usage)
        yield SSE_DONE
