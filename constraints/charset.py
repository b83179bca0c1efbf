"""Character sets as sorted, merged code-point ranges, and what their UTF-8 automata cost.

The regex budget (``regex_budget``) reasons about which characters each part of a pattern can
consume and how many byte-level DFA states a class needs. A class over one-byte characters
costs one state; a class spanning multi-byte UTF-8 needs the intermediate states of its
byte automaton (``[^"]`` 7, Unicode ``\\w`` ~300). Plane 16 (U+100000..U+10FFFF) is left
out everywhere: the compiler removes it from every class (it holds its sentinels).

    >>> utf8_states(((ord("a"), ord("z")),)), utf8_states(complement(((ord('"'), ord('"')),)))
    (1, 7)
"""

from __future__ import annotations

import re
from functools import cache, lru_cache

Ranges = tuple[tuple[int, int], ...]
"""Sorted, disjoint, non-adjacent inclusive ``(low, high)`` code-point ranges."""

MAX_TEXT_CODE_POINT = 0xFFFFF
"""The last code point a constraint may produce (plane 16 holds the compiler's sentinels)."""
EMPTY: Ranges = ()

_SURROGATES = (0xD800, 0xDFFF)
_ENCODED_LENGTH_ENDS = (0x7F, 0x7FF, 0xFFFF)


def merge(ranges) -> Ranges:
    """The canonical ``Ranges`` of any iterable of ``(low, high)`` pairs (clipped to text)."""
    merged: list[list[int]] = []
    for low, high in sorted(ranges):
        high = min(high, MAX_TEXT_CODE_POINT)
        if low > high:
            continue
        if merged and low <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], high)
        else:
            merged.append([low, high])
    return tuple((low, high) for low, high in merged)


def union(*sets: Ranges) -> Ranges:
    """Characters in any of ``sets``."""
    return merge(r for ranges in sets for r in ranges)


def complement(ranges: Ranges) -> Ranges:
    """Text characters not in ``ranges``."""
    out, start = [], 0
    for low, high in ranges:
        if low > start:
            out.append((start, low - 1))
        start = high + 1
    if start <= MAX_TEXT_CODE_POINT:
        out.append((start, MAX_TEXT_CODE_POINT))
    return tuple(out)


def intersects(a: Ranges, b: Ranges) -> bool:
    """Whether some character is in both sets."""
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i][1] < b[j][0]:
            i += 1
        elif b[j][1] < a[i][0]:
            j += 1
        else:
            return True
    return False


def covers(outer: Ranges, inner: Ranges) -> bool:
    """Whether every character of ``inner`` is in ``outer``."""
    return union(outer, inner) == outer


def with_ascii_case(ranges: Ranges) -> Ranges:
    """``ranges`` plus the other case of its ASCII letters (what ``(?i)`` adds, near enough)."""
    extra = []
    for low, high in ranges:
        for start, end, shift in ((65, 90, 32), (97, 122, -32)):
            lo, hi = max(low, start), min(high, end)
            if lo <= hi:
                extra.append((lo + shift, hi + shift))
    return union(ranges, tuple(extra)) if extra else ranges


@cache
def category(pattern: str) -> Ranges:
    """The text characters Python's ``re`` matches with ``pattern`` (``\\w``, ``\\S``, ...).

    Rust's Unicode classes differ at the edges; for a size estimate that is close enough. One
    pass over every scalar value, once per category per process.
    """
    scalars = "".join(map(chr, range(_SURROGATES[0]))) + "".join(
        map(chr, range(_SURROGATES[1] + 1, MAX_TEXT_CODE_POINT + 1))
    )
    return tuple((ord(m.group(0)[0]), ord(m.group(0)[-1])) for m in re.finditer(pattern + "+", scalars))


@lru_cache(maxsize=4096)
def utf8_states(ranges: Ranges) -> int:
    """Non-final states of the minimal byte automaton matching one UTF-8 character in ``ranges``."""
    trie: dict = {}
    for low, high in ranges:
        for sequence in _utf8_sequences(low, high):
            node = trie
            for byte_range in sequence[:-1]:
                node = node.setdefault(byte_range, {})
            node[sequence[-1]] = None  # None: the final state
    distinct: dict[tuple, int] = {}

    def canonical(node: dict) -> int:  # equal suffix automata are one state
        key = tuple(sorted((edge, -1 if child is None else canonical(child)) for edge, child in node.items()))
        return distinct.setdefault(key, len(distinct))

    canonical(trie)
    return max(len(distinct), 1)


def _utf8_sequences(low: int, high: int) -> list[tuple[tuple[int, int], ...]]:
    """Split a scalar range into runs whose UTF-8 encodings are a product of byte ranges."""
    if low > high:
        return []
    if low <= _SURROGATES[1] and high >= _SURROGATES[0]:  # no UTF-8 encoding
        return _utf8_sequences(low, _SURROGATES[0] - 1) + _utf8_sequences(_SURROGATES[1] + 1, high)
    for end in _ENCODED_LENGTH_ENDS:
        if low <= end < high:
            return _utf8_sequences(low, end) + _utf8_sequences(end + 1, high)
    width = len(chr(low).encode("utf-8"))
    for continuation in range(1, width):
        mask = (1 << (6 * continuation)) - 1
        if low & ~mask != high & ~mask:
            if low & mask:
                return _utf8_sequences(low, low | mask) + _utf8_sequences((low | mask) + 1, high)
            if high & mask != mask:
                return _utf8_sequences(low, (high & ~mask) - 1) + _utf8_sequences(high & ~mask, high)
    first, last = chr(low).encode("utf-8"), chr(high).encode("utf-8")
    return [tuple(zip(first, last))]
