"""Backends that speak SGLang's native ``generate`` protocol (in process or over HTTP).

``Runtime`` and ``RuntimeEndpoint`` differ only in transport: they implement ``_generate`` and
``_generate_stream`` with the signature of ``sglite.Engine.generate``; everything a program
needs (prompt assembly, streaming, select scoring) is written once here.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from typing import Any

from sglite.lang.backends.base import Backend, PromptView
from sglite.lang.choices import ChoicesDecision, ChoicesSamplingMethod
from sglite.lang.ir import GenParams

BOUNDARY_WINDOW = 8
"""Prefix tokens re-read when scoring choices: how far back joint tokenization may differ."""


class NativeBackend(Backend):
    """Program execution on top of a ``generate(prompt, sampling_params, ...)`` call."""

    @abstractmethod
    def _generate(
        self,
        prompt: str | list[int] | list[str] | list[list[int]],
        sampling_params: dict[str, Any],
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
        return_text_in_logprobs: bool = False,
    ) -> dict | list[dict]:
        """``Engine.generate`` semantics: a dict per prompt, lists in, lists out; with
        ``return_text_in_logprobs`` each logprob entry carries its token's text (SGLang's option)."""

    @abstractmethod
    def _generate_stream(
        self,
        prompt: str,
        sampling_params: dict[str, Any],
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
        return_text_in_logprobs: bool = False,
    ) -> Iterator[dict]:
        """Stream SGLang's ``/generate`` events: ``{"text": all text so far, "meta_info": {...}}`` with each
        logprob entry in one event only and ``output_token_logprobs_length`` the running count."""

    def _sampling_params(self, params: GenParams) -> dict[str, Any]:
        from sglite.lang.global_config import global_config

        sampling = params.with_extra_stop(self.chat_template.stop_str).to_sampling_params()
        if not global_config.skip_special_tokens_in_output:
            sampling["skip_special_tokens"] = False
        return sampling

    def generate(self, prompt: PromptView, params: GenParams) -> tuple[str | list[str], dict | list[dict]]:
        out = self._generate(prompt.text, self._sampling_params(params), **params.request_options())
        if isinstance(out, list):  # n > 1: one result per sample
            return [o["text"] for o in out], [o["meta_info"] for o in out]
        return out["text"], out["meta_info"]

    def generate_stream(self, prompt: PromptView, params: GenParams) -> Iterator[tuple[str, dict]]:
        """``(new text, this event's meta_info)`` from SGLang-format events (cumulative text, logprob deltas;
        the interpreter joins the deltas into the variable's meta info)."""
        sent = 0
        for event in self._generate_stream(prompt.text, self._sampling_params(params), **params.request_options()):
            text = event["text"]
            yield text[sent:], event["meta_info"]
            sent = len(text)

    def cache_prefix(self, text: str) -> None:
        if text:
            self._generate(text, {"max_new_tokens": 0})

    def select(
        self, prompt: PromptView, choices: list[str], temperature: float, choices_method: ChoicesSamplingMethod
    ) -> ChoicesDecision:
        """Score every choice in one batched prefill against the shared, already cached prefix.

        The prompt and each choice are tokenized *jointly* (as the model will read them), so a
        choice that merges with the prompt's last token is scored from where the tokenizations
        part; every choice is scored from the same position, the earliest such one.
        """
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"select() needs a non-empty list of non-empty strings, got {choices!r}")
        prefix = prompt.text
        prefix_len = 0
        if prefix:
            # Prefill the prefix once; its token count bounds the boundary search below.
            prefix_len = self._generate(prefix, {"max_new_tokens": 0})["meta_info"]["prompt_tokens"]
        start = max(prefix_len - BOUNDARY_WINDOW, 0)
        texts = ([prefix] if prefix else []) + [prefix + choice for choice in choices]
        outs = self._generate(texts, {"max_new_tokens": 0}, return_logprob=True, logprob_start_len=start)
        prefix_tail = [tid for _, tid, _ in outs[0]["meta_info"]["input_token_logprobs"]] if prefix else []
        choice_outs = outs[1:] if prefix else outs
        entries = [out["meta_info"]["input_token_logprobs"] for out in choice_outs]
        boundary = min(start + _common_prefix_len(prefix_tail, [tid for _, tid, _ in e]) for e in entries)
        # The first prompt token has no logprob (nothing precedes it); it cannot be scored.
        scored = [[tuple(t) for t in e[boundary - start:] if t[0] is not None] for e in entries]
        normalized = [sum(t[0] for t in s) / len(s) if s else 0.0 for s in scored]

        unconditional = None
        if choices_method.requires_unconditional_logprobs:
            ids = [[tid for _, tid, _ in e[boundary - start:]] for e in entries]
            bare = self._generate(ids, {"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0)
            unconditional = []
            for tokens, out, s in zip(ids, bare, scored):
                entries = [tuple(t) for t in out["meta_info"]["input_token_logprobs"]]
                # Leading tokens without a logprob may be reported as (None, id) or left out.
                entries = [(None, tid, None) for tid in tokens[: len(tokens) - len(entries)]] + entries
                unconditional.append(entries[len(entries) - len(s):])  # aligned with `scored`

        decision = choices_method(
            choices=list(choices),
            normalized_prompt_logprobs=normalized,
            input_token_logprobs=scored,
            output_token_logprobs=[[] for _ in choices],
            unconditional_token_logprobs=unconditional,
        )
        meta = {
            "choices": list(choices),
            "normalized_prompt_logprobs": normalized,
            "input_token_logprobs": scored,
            "output_token_logprobs": [[] for _ in choices],
            "unconditional_token_logprobs": unconditional,
            "prompt_tokens": sum(out["meta_info"]["prompt_tokens"] for out in choice_outs),
            "completion_tokens": 0,
            "cached_tokens": sum(out["meta_info"]["cached_tokens"] for out in choice_outs),
            "logprob_start_len": boundary,
            **decision.meta_info,
        }
        return ChoicesDecision(decision.decision, meta)


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
