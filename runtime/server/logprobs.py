"""Engine logprob tuples ``(logprob, token_id, None)`` rendered in OpenAI's two response formats."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from sglite.runtime.server.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

LogprobEntry = Sequence[Any]  # (logprob | None, token_id, text | None), as the engine returns them

# What OpenAI reports for a token whose probability underflowed (a masked or filtered token).
FLOOR_LOGPROB = -9999.0
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def finite_logprob(value: float) -> float:
    """JSON has no -inf: clamp to OpenAI's floor."""
    return value if math.isfinite(value) else FLOOR_LOGPROB


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-printable-character map used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class TokenStrings:
    """Token id -> the text and UTF-8 bytes OpenAI reports for it; cached per id.

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
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        piece = self.tokenizer.convert_ids_to_tokens(token_id) or ""
        if piece.startswith("▁") and not text.startswith(" "):
            text = " " + text  # SentencePiece decoders drop a leading space on a lone token
        raw = text.encode("utf-8")
        if "\ufffd" in text:
            # Part of a multi-byte character: recover its real bytes from the vocabulary piece.
            match = _BYTE_TOKEN.match(piece)
            decoder = _byte_level_decoder()
            if match:
                raw = bytes([int(match.group(1), 16)])
            elif piece and all(c in decoder for c in piece):
                raw = bytes(decoder[c] for c in piece)
        entry = (text, list(raw))
        if len(self._cache) < 1_000_000:
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
