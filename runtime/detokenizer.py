"""Incremental detokenization and stop-string matching for one request's output."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def _direct_backend(tokenizer) -> Tokenizer | None:
    """The Rust ``tokenizers.Tokenizer`` behind ``tokenizer`` when decoding through it gives the same
    text, else None.

    transformers' ``decode`` wraps the Rust call in several microseconds of Python (argument
    conversion, clean-up checks); at two decodes per token per request that is most of the
    detokenizer's cost. Only a stock fast tokenizer with ``clean_up_tokenization_spaces`` off
    qualifies: anything that post-processes text keeps the wrapper.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return None
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend as stock
    except ImportError:  # transformers 4.x: keep the wrapper
        return None
    cls = type(tokenizer)
    if not isinstance(tokenizer, stock) or cls.decode is not stock.decode or cls._decode is not stock._decode:
        return None
    return backend


class IncrementalDecoder:
    """Turns a growing list of token ids into text without re-decoding the whole output each step.

    Decoding a short window and diffing against the window's earlier text keeps tokenizers' context
    effects (leading spaces of SentencePiece, multi-token UTF-8 characters) right: text that ends in
    an incomplete character (U+FFFD) is held back until the next token completes it.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True, prompt_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._backend = _direct_backend(tokenizer)
        # A few prompt tokens give the first output token its left context (e.g. "▁" handling).
        self._ids: list[int] = list(prompt_ids[-4:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""

    def _decode(self, ids: Sequence[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def append(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the newly completed text (possibly empty)."""
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end, emit whatever was held back (even an incomplete character)."""
        new_text = self._decode(self._ids[self._prefix_offset :])
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        self.text += delta
        return delta


def find_stop(text: str, stops: Sequence[str], search_from: int) -> tuple[int, str] | None:
    """Earliest stop string that ends at or after ``search_from``: ``(start index, stop)``."""
    best: tuple[int, str] | None = None
    for stop in stops:
        idx = text.find(stop, max(0, search_from - len(stop) + 1))
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, stop)
    return best


STOP_REGEX_WINDOW = 256
"""Characters before the new text that a stop regex is searched over (SGLang bounds patterns to 256)."""


def match_stop(
    text: str, stops: Sequence[str], stop_regex: Sequence[str], search_from: int
) -> tuple[int, int, str] | None:
    """The earliest stop string or stop-regex match ending at or after ``search_from``:
    ``(start, end, matched)`` where ``matched`` is the stop string or the pattern.

        >>> match_stop("x = 42;", [], ["[0-9]+;"], 5)
        (4, 7, '[0-9]+;')
        >>> match_stop("a. b", ["."], [], 1)
        (1, 2, '.')
    """
    best: tuple[int, int, str] | None = None
    hit = find_stop(text, stops, search_from) if stops else None
    if hit is not None:
        best = (hit[0], hit[0] + len(hit[1]), hit[1])
    if stop_regex:
        window_start = max(0, search_from - STOP_REGEX_WINDOW)
        for pattern in stop_regex:
            for found in re.finditer(pattern, text[window_start:]):
                start, end = window_start + found.start(), window_start + found.end()
                if end > search_from and end > start:  # it uses new text (an empty match stops nothing)
                    if best is None or start < best[0]:
                        best = (start, end, pattern)
                    break
    return best


def held_back_len(text: str, stops: Sequence[str]) -> int:
    """Length of the text tail that could still become a stop string; streaming withholds it."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                longest = max(longest, k)
                break
    return longest
