"""Engine logprob tuples ``(logprob, token_id, None)`` rendered in OpenAI's two response formats."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from sglite.constraints.vocabulary import get_vocabulary
from sglite.runtime.server.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

LogprobEntry = Sequence[Any]  # (logprob | None, token_id, text | None), as the engine returns them

# What OpenAI reports for a token whose probability underflowed (a masked or filtered token).
FLOOR_LOGPROB = -9999.0


def finite_logprob(value: float) -> float:
    """JSON has no -inf: clamp to OpenAI's floor."""
    return value if math.isfinite(value) else FLOOR_LOGPROB


class TokenStrings:
    """Token id -> the text and UTF-8 bytes OpenAI reports for it; cached per id.

    Bytes come from the constraint layer's byte vocabulary (exact even for a token that is half
    of a multi-byte character); special tokens, which have no bytes there, are decoded as text.

        >>> strings = TokenStrings(engine.tokenizer)
        >>> strings.text(283), strings.bytes(283)
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def _lookup(self, token_id: int) -> tuple[str, list[int]]:
        cached = self._cache.get(token_id)
        if cached is not None:
            return cached
        table = get_vocabulary(self.tokenizer).token_bytes
        raw = table[token_id] if 0 <= token_id < len(table) else None
        if raw is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            raw = text.encode("utf-8")
        else:
            text = raw.decode("utf-8", errors="replace")
        entry = (text, list(raw))
        self._cache[token_id] = entry
        return entry

    def text(self, token_id: int) -> str:
        return self._lookup(token_id)[0]

    def bytes(self, token_id: int) -> list[int]:
        return self._lookup(token_id)[1]


def chat_logprobs(
    strings: TokenStrings, token_logprobs: Sequence[LogprobEntry], top_logprobs: Sequence[Sequence[LogprobEntry]] | None
) -> ChatLogprobs:
    """``choices[i].logprobs`` of a chat completion (or of one streamed chunk)."""
    content = []
    for position, (logprob, token_id, *_) in enumerate(token_logprobs):
        alternatives = top_logprobs[position] if top_logprobs and position < len(top_logprobs) else []
        content.append(
            ChatTokenLogprob(
                token=strings.text(token_id),
                logprob=finite_logprob(logprob),
                bytes=strings.bytes(token_id),
                top_logprobs=[
                    TopLogprob(token=strings.text(alt_id), logprob=finite_logprob(alt_lp), bytes=strings.bytes(alt_id))
                    for alt_lp, alt_id, *_ in alternatives
                ],
            )
        )
    return ChatLogprobs(content=content)


def completion_logprobs(
    strings: TokenStrings,
    token_logprobs: Sequence[LogprobEntry],
    top_logprobs: Sequence[Sequence[LogprobEntry] | None] | None,
    text_offset: int,
) -> tuple[CompletionLogprobs, int]:
    """The legacy ``/v1/completions`` logprobs object, and the text offset after its last token.

    Each ``top_logprobs`` dict also holds the sampled token, so it has up to ``logprobs + 1``
    entries, as OpenAI documents. A position without a logprob (the first echoed prompt token) is None.
    """
    result = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for position, (logprob, token_id, *_) in enumerate(token_logprobs):
        token = strings.text(token_id)
        result.tokens.append(token)
        result.text_offset.append(text_offset)
        text_offset += len(token)
        if logprob is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            continue
        result.token_logprobs.append(finite_logprob(logprob))
        alternatives = top_logprobs[position] if top_logprobs and position < len(top_logprobs) else None
        top = {strings.text(alt_id): finite_logprob(alt_lp) for alt_lp, alt_id, *_ in alternatives or ()}
        top.setdefault(token, finite_logprob(logprob))
        result.top_logprobs.append(top)
    return result, text_offset


def with_logprob_texts(meta_info: dict[str, Any], token_text: Callable[[int], str]) -> dict[str, Any]:
    """``meta_info`` with every logprob entry's third element set to its token's text.

    SGLang's ``return_text_in_logprobs``: ``(logprob, token_id, None)`` -> ``(logprob, token_id, "text")``.

        >>> with_logprob_texts(meta, lambda tid: tokenizer.decode([tid]))["output_token_logprobs"]
    """

    def fill(entries: Sequence[LogprobEntry] | None) -> list[tuple] | None:
        return None if entries is None else [(lp, tid, token_text(tid)) for lp, tid, *_ in entries]

    filled = dict(meta_info)
    for key in ("input_token_logprobs", "output_token_logprobs"):
        if key in filled:
            filled[key] = fill(filled[key])
    for key in ("input_top_logprobs", "output_top_logprobs"):
        if key in filled:
            filled[key] = [fill(row) for row in filled[key]]
    return filled
