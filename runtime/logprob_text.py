"""Token text for logprob entries: the strings and bytes a token id is reported as, and SGLang's
``return_text_in_logprobs`` filling. Shared by the server's formats and the language's in-process backend."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from sglite.constraints.vocabulary import get_vocabulary

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

        >>> strings = TokenStrings(engine.tokenizer)   # doctest: +SKIP
        >>> strings.text(283), strings.bytes(283)      # doctest: +SKIP
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self._table: tuple[bytes | None, ...] | None = None  # built on first use (~1 s for 50k tokens), then kept

    def _lookup(self, token_id: int) -> tuple[str, list[int]]:
        cached = self._cache.get(token_id)
        if cached is not None:
            return cached
        if self._table is None:
            self._table = get_vocabulary(self.tokenizer).token_bytes
        table = self._table
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


def with_logprob_texts(meta_info: dict[str, Any], token_text: Callable[[int], str]) -> dict[str, Any]:
    """``meta_info`` with every logprob entry's third element set to its token's text.

    SGLang's ``return_text_in_logprobs``: ``(logprob, token_id, None)`` -> ``(logprob, token_id, "text")``.

        >>> meta = {"output_token_logprobs": [(-0.25, 7, None)], "completion_tokens": 1}
        >>> with_logprob_texts(meta, lambda token_id: f"<{token_id}>")["output_token_logprobs"]
        [(-0.25, 7, '<7>')]
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
