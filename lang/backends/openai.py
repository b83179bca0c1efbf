"""``sgl.OpenAI``: programs run against an OpenAI-compatible API (the ``openai`` SDK).

    >>> backend = sgl.OpenAI("my-model", base_url="http://127.0.0.1:30000/v1", api_key="sk-local")  # doctest: +SKIP

Chat models (the default) receive the program's chat turns as ``messages``; a ``gen`` must then
open an assistant turn. Completion models (``is_chat_model=False``) receive the text rendered
with the chat template. Constraints travel as the SGLang/sglite extensions (``regex`` in the
request body, ``json_schema`` as ``response_format``), so they need a server that has them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from sglite.lang.backends.base import Backend, PromptView
from sglite.lang.chat_template import ChatTemplate, resolve_chat_template
from sglite.lang.choices import ChoicesDecision, ChoicesSamplingMethod
from sglite.lang.ir import GenParams, LangError


class OpenAI(Backend):
    """An OpenAI-compatible endpoint as a program backend.

    ``select`` is decided by greedy generation constrained to the choices (chat APIs return no
    prompt logprobs), so ``choices_method`` does not apply and no per-choice scores are recorded.
    """

    def __init__(
        self,
        model_name: str,
        base_url: str | None = None,
        api_key: str | None = None,
        is_chat_model: bool = True,
        chat_template: str | ChatTemplate | None = None,
        **client_options: Any,
    ) -> None:
        import openai

        key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"  # local servers accept any key
        self.client = openai.OpenAI(base_url=base_url, api_key=key, **client_options)
        self.model_name = model_name
        self.is_chat_model = is_chat_model
        self.chat_template = resolve_chat_template(chat_template, model_name)

    # ---- requests ----------------------------------------------------------------------------
    def _request(self, prompt: PromptView, params: GenParams) -> dict[str, Any]:
        regex, json_schema = params.constraint()
        extra: dict[str, Any] = {}
        if params.top_k not in (None, -1, 0):
            extra["top_k"] = params.top_k
        if params.min_p:
            extra["min_p"] = params.min_p
        if params.min_new_tokens:
            extra["min_tokens"] = params.min_new_tokens
        if params.stop_token_ids:
            extra["stop_token_ids"] = list(params.stop_token_ids)
        if params.ignore_eos:
            extra["ignore_eos"] = True
        if regex is not None:
            extra["regex"] = regex
        stop = params.stop if self.is_chat_model else params.with_extra_stop(self.chat_template.stop_str).stop
        request: dict[str, Any] = {
            "model": self.model_name,
            "max_tokens": params.max_new_tokens,
            "stop": ([stop] if isinstance(stop, str) else list(stop or [])) or None,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "frequency_penalty": params.frequency_penalty,
            "presence_penalty": params.presence_penalty,
        }
        options = params.request_options()
        if self.is_chat_model:
            request["messages"] = self._messages(prompt)
            if json_schema is not None:
                import json

                request["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "output", "schema": json.loads(json_schema)},
                }
            if options["return_logprob"]:
                request["logprobs"] = True
                request["top_logprobs"] = options["top_logprobs_num"]
        else:
            if json_schema is not None:
                raise LangError("json_schema needs a chat model with OpenAI backends (is_chat_model=True)")
            request["prompt"] = prompt.text
            if options["return_logprob"]:
                request["logprobs"] = options["top_logprobs_num"]
        if extra:
            request["extra_body"] = extra
        return {k: v for k, v in request.items() if v is not None}

    def _messages(self, prompt: PromptView) -> list[dict]:
        if prompt.open_role != "assistant" or prompt.open_role_text:
            raise LangError(
                "with an OpenAI chat model, gen() must be the first thing inside sgl.assistant(...) "
                f"(open turn: {prompt.open_role!r}, its text so far: {prompt.open_role_text!r}); "
                "or use a completion model with is_chat_model=False"
            )
        return [dict(m) for m in prompt.messages]

    # ---- backend API ---------------------------------------------------------------------------
    def generate(self, prompt: PromptView, params: GenParams) -> tuple[str, dict]:
        request = self._request(prompt, params)
        if self.is_chat_model:
            response = self.client.chat.completions.create(**request)
            choice = response.choices[0]
            text = choice.message.content or ""
        else:
            response = self.client.completions.create(**request)
            choice = response.choices[0]
            text = choice.text
        meta = {"id": response.id, "finish_reason": {"type": choice.finish_reason}, **_usage(response.usage)}
        logprobs = getattr(choice, "logprobs", None)
        if logprobs is not None and getattr(logprobs, "content", None):
            meta["output_token_logprobs"] = [(t.logprob, None, t.token) for t in logprobs.content]
        return text, meta

    def generate_stream(self, prompt: PromptView, params: GenParams) -> Iterator[tuple[str, dict]]:
        request = {**self._request(prompt, params), "stream": True, "stream_options": {"include_usage": True}}
        create = self.client.chat.completions.create if self.is_chat_model else self.client.completions.create
        meta: dict[str, Any] = {}
        for chunk in create(**request):
            meta["id"] = chunk.id
            if chunk.usage is not None:
                meta.update(_usage(chunk.usage))
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            if choice.finish_reason is not None:
                meta["finish_reason"] = {"type": choice.finish_reason}
            delta = (choice.delta.content if self.is_chat_model else choice.text) or ""
            yield delta, dict(meta)
        yield "", dict(meta)  # the usage chunk comes last; report the final counts

    def select(
        self, prompt: PromptView, choices: list[str], temperature: float, choices_method: ChoicesSamplingMethod
    ) -> ChoicesDecision:
        from sglite.constraints import regex_for_choices

        longest = max(len(c.encode("utf-8")) for c in choices)
        params = GenParams(max_new_tokens=longest + 8, temperature=0.0, regex=regex_for_choices(list(choices)))
        text, meta = self.generate(prompt, params)
        matches = [c for c in choices if text.startswith(c)]
        if not matches:
            raise ValueError(
                f"the server answered {text!r}, not one of {choices!r}: it ignored the 'regex' constraint "
                "(select with OpenAI backends needs an SGLang-compatible server)"
            )
        decision = max(matches, key=len)
        return ChoicesDecision(decision, {**meta, "choices": list(choices), "method": "constrained generation"})


def _usage(usage: Any) -> dict[str, int]:
    if usage is None:
        return {}
    details = getattr(usage, "prompt_tokens_details", None)
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_tokens": (getattr(details, "cached_tokens", None) or 0) if details is not None else 0,
    }
