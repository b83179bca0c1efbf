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
        """Score every choice in one batched prefill against the shared, already cached prefix, as
        SGLang's ``RuntimeEndpoint.select`` does (docs/compatibility.md).

        Each ``prefix + choice`` is scored from two tokens before the prefix's end: the first entry
        (no logprob) and the prefix's last token cover a choice that merges with it when tokenized
        jointly ("token healing"); when the prefix's text ends with the first entry's token, that
        entry is dropped. ``normalized_prompt_logprobs`` are the means of the remaining logprobs.
        """
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"select() needs a non-empty list of non-empty strings, got {choices!r}")
        prefix = prompt.text
        prefix_len = 0
        if prefix:  # prefill the prefix once, so every choice starts from a cache hit
            prefix_len = self._generate(prefix, {"max_new_tokens": 0})["meta_info"]["prompt_tokens"]
        start = max(prefix_len - 2, 0)
        outs = self._generate(
            [prefix + choice for choice in choices], {"max_new_tokens": 0, "temperature": 0},
            return_logprob=True, logprob_start_len=start, return_text_in_logprobs=True,
        )
        scored = []
        for out in outs:
            entries = [tuple(e) for e in out["meta_info"]["input_token_logprobs"]]
            if entries and entries[0][2] and prefix.endswith(entries[0][2]):
                entries = entries[1:]
            scored.append(entries)
        normalized = [normalized_prompt_logprob(entries) for entries in scored]

        unconditional = None
        if choices_method.requires_unconditional_logprobs:
            ids = [[tid for _, tid, _ in entries] for entries in scored]
            bare = self._generate(ids, {"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0)
            unconditional = [[tuple(e) for e in out["meta_info"]["input_token_logprobs"]] for out in bare]

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
            "prompt_tokens": sum(out["meta_info"]["prompt_tokens"] for out in outs),
            "completion_tokens": 0,
            "cached_tokens": sum(out["meta_info"]["cached_tokens"] for out in outs),
            "logprob_start_len": start,
            **decision.meta_info,
        }
        return ChoicesDecision(decision.decision, meta)


def normalized_prompt_logprob(entries: list[tuple]) -> float:
    """The mean logprob of the entries that have one (SGLang's ``compute_normalized_prompt_logprobs``).

        >>> normalized_prompt_logprob([(None, 5, "a"), (-1.0, 6, "b"), (-2.0, 7, "c")])
        -1.5
    """
    values = [lp for lp, *_ in entries if lp is not None]
    return sum(values) / len(values) if values else 0.0
