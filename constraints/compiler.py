"""Constraint source -> regex -> cached token-level FSM (an outlines-core ``Index``).

The regex flavour is Rust's ``regex`` crate (what outlines-core compiles): Python's common
syntax works, plus ``\\p{L}``-style classes; lookarounds, backreferences, word boundaries and
anchors inside the pattern do not. A leading ``^`` and trailing ``$`` are dropped, since a
constraint always matches the whole output, and ``\\d`` means ``[0-9]`` (not every Unicode digit).

Compiling is the slow part (a DFA over the whole vocabulary), so ``compile_fsm`` keeps an LRU
of ``CompiledFSM`` keyed by (regex, vocabulary); each ``CompiledFSM`` in turn caches, per FSM
state, the disallowed-token mask the step loop applies with one ``masked_fill_``.

    >>> import re
    >>> rx = regex_for_choices(["yes", "no", "a.b"])
    >>> rx, bool(re.fullmatch(rx, "a.b")), bool(re.fullmatch(rx, "axb"))
    ('(?:yes|no|a\\\\.b)', True, False)
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict

import torch
from outlines_core import Index
from outlines_core import json_schema as oc_json

from sglite.constraints.errors import ConstraintError
from sglite.constraints.vocabulary import ACCEPT_SENTINEL, ACCEPT_SENTINEL_ID, TokenVocabulary

INT_REGEX = r"-?(?:0|[1-9][0-9]*)"
"""A JSON/Python integer literal: optional ``-``, no leading zeros."""
FLOAT_REGEX = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
"""A JSON number (also parses with ``float``): sign, fraction and exponent optional."""
BOOL_REGEX = r"(?:True|False)"
"""A Python ``bool`` literal (``gen(dtype=bool)``); JSON booleans come from schemas."""
STRING_REGEX = oc_json.STRING
"""A double-quoted JSON string with JSON escapes (also a valid Python literal)."""

_TYPED = {int: INT_REGEX, float: FLOAT_REGEX, bool: BOOL_REGEX, str: STRING_REGEX}


def regex_for_type(python_type: type) -> str:
    """The literal regex of ``int``, ``float``, ``bool`` or ``str``.

        >>> regex_for_type(bool)
        '(?:True|False)'
    """
    try:
        return _TYPED[python_type]
    except KeyError:
        raise ConstraintError(f"no literal regex for {python_type!r}; use int, float, bool or str") from None


def regex_for_choices(choices: list[str] | tuple[str, ...]) -> str:
    """An alternation matching exactly one of ``choices`` (each taken literally)."""
    if isinstance(choices, str) or not isinstance(choices, (list, tuple)):
        raise ConstraintError(f"choices must be a list of strings, got {type(choices).__name__}")
    if not choices:
        raise ConstraintError("choices is empty: give at least one string")
    bad = [c for c in choices if not isinstance(c, str)]
    if bad:
        raise ConstraintError(f"choices must all be strings; got {bad[0]!r}")
    unique = list(dict.fromkeys(choices))  # the DFA accepts the union, so order is cosmetic
    return "(?:" + "|".join(re.escape(c) for c in unique) + ")"


def normalize_regex(regex: str) -> str:
    """The regex outlines-core compiles: outer anchors dropped, ``\\d`` made ASCII.

    Rust's ``\\d`` is any Unicode digit (``۸`` included); constraints want ``[0-9]``.

        >>> normalize_regex(r"^\\d+[\\d.]$")
        '[0-9]+[0-9.]'
    """
    return _ascii_digits(strip_anchors(regex))


def _ascii_digits(regex: str) -> str:
    out: list[str] = []
    i, in_class = 0, False
    while i < len(regex):
        char = regex[i]
        if char == "\\" and i + 1 < len(regex):
            escaped = regex[i + 1]
            out.append(("0-9" if in_class else "[0-9]") if escaped == "d" else regex[i : i + 2])
            i += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
            if regex[i + 1 : i + 2] == "]":  # a leading "]" is literal
                out.append("[]")
                i += 2
                continue
        out.append(char)
        i += 1
    return "".join(out)


def strip_anchors(regex: str) -> str:
    """Drop a leading ``^`` / ``\\A`` and a trailing unescaped ``$`` / ``\\z``: matches are always whole."""
    if regex.startswith("^"):
        regex = regex[1:]
    elif regex.startswith(r"\A"):
        regex = regex[2:]
    for tail in ("$", r"\z"):
        if regex.endswith(tail) and _unescaped_at(regex, len(regex) - len(tail)):
            regex = regex[: -len(tail)]
            break
    return regex


def _unescaped_at(regex: str, index: int) -> bool:
    backslashes = 0
    while index - 1 - backslashes >= 0 and regex[index - 1 - backslashes] == "\\":
        backslashes += 1
    return backslashes % 2 == 0


# Constructs a DFA cannot express, found by scanning outside character classes.
_UNSUPPORTED = (
    ("(?=", "lookahead"), ("(?!", "negative lookahead"), ("(?<=", "lookbehind"),
    ("(?<!", "negative lookbehind"), ("(?P=", "named backreference"),
)


def diagnose_regex(regex: str, detail: str) -> ConstraintError:
    """A ``ConstraintError`` naming where ``regex`` goes wrong (``detail``: outlines-core's message)."""
    position, what = _find_unsupported(regex)
    if position is not None:
        return ConstraintError(
            f"regex {regex!r} uses a {what} at position {position}, which the constraint FSM cannot "
            "express; rewrite it without lookarounds, backreferences, word boundaries or inner anchors"
        )
    try:
        re.compile(regex)
    except re.error as exc:
        if exc.msg.startswith((r"bad escape \p", r"bad escape \P")):
            return ConstraintError(f"invalid regex {regex!r}: unknown Unicode class at position {exc.pos}")
        return ConstraintError(f"invalid regex {regex!r}: {exc.msg} at position {exc.pos}")
    return ConstraintError(f"invalid regex {regex!r}: {detail.splitlines()[0] if detail else 'rejected'}")


def _find_unsupported(regex: str) -> tuple[int | None, str]:
    i, in_class = 0, False
    while i < len(regex):
        char = regex[i]
        if char == "\\" and i + 1 < len(regex):
            escaped = regex[i + 1]
            if not in_class:
                if escaped in "bB":
                    return i, r"word boundary \b"
                if escaped.isdigit() and escaped != "0":
                    return i, "backreference"
                if escaped in "AzZ":
                    return i, f"anchor \\{escaped}"
            i += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
            if regex[i + 1 : i + 2] == "]" or regex[i + 1 : i + 3] == "^]":
                i += 2 if regex[i + 1] == "]" else 3  # a leading "]" is literal
                continue
        elif char in "^$":
            return i, f"anchor {char}"
        else:
            for prefix, what in _UNSUPPORTED:
                if regex.startswith(prefix, i):
                    return i, what
        i += 1
    return None, ""


class CompiledFSM:
    """The token-level automaton of one regex over one vocabulary, plus per-state caches.

    Shared by every request using the same constraint; its caches are filled lazily from the
    step loop (plain dict writes, safe under the GIL).

    The index is built for ``(?:regex)`` followed by ``ACCEPT_SENTINEL``, and a state accepts
    iff the sentinel token leads to one of outlines-core's final states. Why: outlines-core
    0.2.14 reads regex-automata's one-byte-delayed match flag as "match here", so it drops
    every token that ends one byte after a complete match without itself completing one
    (``ab(cd)?`` never reaches ``abcd``; ``12`` never continues with ``.``). With the sentinel
    no real token can complete a match, so no transition is lost.
    """

    MASK_CACHE_BYTES = 16 << 20
    """Budget for cached boolean masks per FSM (``vocab`` bytes each); least recently used go first."""

    def __init__(self, regex: str, vocabulary: TokenVocabulary, index: Index) -> None:
        self.regex = regex
        self.vocabulary = vocabulary
        self.index = index
        self.initial_state: int = index.get_initial_state()
        self._sentinel_finals = frozenset(index.get_final_states())
        self._excluded = frozenset({ACCEPT_SENTINEL_ID, vocabulary.outlines.get_eos_token_id()})
        self._masks: OrderedDict[tuple[int, int, torch.device], torch.Tensor] = OrderedDict()
        self._accepting: dict[int, bool] = {}
        self._has_continuation: dict[int, bool] = {}
        self.forced_bytes: dict[int, bytes] = {}
        """Jump-forward memo: state -> bytes every continuation starts with (see ``jump_forward``)."""

    def text_tokens(self, state: int) -> list[int]:
        """Ids of the real (non-EOS) tokens allowed in ``state``."""
        excluded = self._excluded
        return [t for t in self.index.get_allowed_tokens(state) or [] if t not in excluded]

    def allowed_tokens(self, state: int) -> list[int]:
        """Ids allowed in ``state``: its text tokens, plus every EOS id when it accepts."""
        allowed = self.text_tokens(state)
        if self.is_final(state):
            allowed.extend(self.vocabulary.eos_token_ids)
        return allowed

    def next_state(self, state: int, token_id: int) -> int | None:
        """The state after text token ``token_id``, or ``None`` if it is not allowed (or is EOS)."""
        if token_id in self._excluded or token_id in self.vocabulary.eos_token_ids:
            return None
        return self.index.get_next_state(state, token_id)

    def is_final(self, state: int) -> bool:
        """Whether the text so far matches the whole regex (so EOS may come next)."""
        known = self._accepting.get(state)
        if known is None:
            after = self.index.get_next_state(state, ACCEPT_SENTINEL_ID)
            known = after is not None and after in self._sentinel_finals
            self._accepting[state] = known
        return known

    def has_continuation(self, state: int) -> bool:
        """Whether any non-EOS token is allowed in ``state``."""
        known = self._has_continuation.get(state)
        if known is None:
            known = bool(self.text_tokens(state))
            self._has_continuation[state] = known
        return known

    def disallowed_mask(self, state: int, width: int, device: torch.device) -> torch.Tensor:
        """A cached ``[width]`` bool tensor, True where a token is forbidden in ``state``."""
        key = (state, width, device)
        mask = self._masks.get(key)
        if mask is not None:
            self._masks.move_to_end(key)
            return mask
        allowed = torch.tensor([t for t in self.allowed_tokens(state) if t < width], dtype=torch.long)
        mask = torch.ones(width, dtype=torch.bool)
        mask[allowed] = False
        mask = mask.to(device)
        self._masks[key] = mask
        while len(self._masks) > max(8, self.MASK_CACHE_BYTES // max(width, 1)):
            self._masks.popitem(last=False)
        return mask


def _with_sentinel(regex: str) -> str:
    # In verbose mode a trailing "# comment" would swallow the closing parenthesis.
    inner = regex + "\n" if re.search(r"\(\?[a-zA-Z-]*x", regex) else regex
    return f"(?:{inner})\\x{{{ord(ACCEPT_SENTINEL):X}}}"


class _CompileCache:
    """LRU of ``CompiledFSM`` keyed by (regex, vocabulary key); one compile per key at a time."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple, CompiledFSM] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[tuple, threading.Lock] = {}
        self.hits = 0
        self.misses = 0

    def get(self, regex: str, vocabulary: TokenVocabulary) -> CompiledFSM:
        key = (regex, vocabulary.key)
        with self._lock:
            fsm = self._lookup(key)
            if fsm is not None:
                return fsm
            build_lock = self._building.setdefault(key, threading.Lock())
        # Compile outside the cache lock so other constraints proceed; the per-key lock stops
        # two threads compiling the same regex twice.
        with build_lock:
            with self._lock:
                fsm = self._lookup(key)
                if fsm is not None:
                    return fsm
                self.misses += 1
            try:
                index = Index(_with_sentinel(regex), vocabulary.outlines)
            except (ValueError, RuntimeError, OverflowError) as exc:
                message = str(exc)
                if "incompatible" in message and _find_unsupported(regex)[0] is None:
                    missing = re.search(r"characters: (\[.*?\])", message)
                    raise ConstraintError(
                        f"the tokenizer cannot spell regex {regex!r}: no token produces "
                        f"{missing.group(1) if missing else 'some required character'}"
                    ) from None
                raise diagnose_regex(regex, message) from None
            finally:
                with self._lock:
                    self._building.pop(key, None)
            fsm = CompiledFSM(regex, vocabulary, index)
            with self._lock:
                self._entries[key] = fsm
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
            return fsm

    def _lookup(self, key: tuple) -> CompiledFSM | None:
        fsm = self._entries.get(key)
        if fsm is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return fsm

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_cache = _CompileCache(capacity=64)


def compile_fsm(regex: str, vocabulary: TokenVocabulary) -> CompiledFSM:
    """The cached ``CompiledFSM`` of ``regex`` over ``vocabulary`` (compiling it on a miss).

    Raises ``ConstraintError`` naming the position of an invalid or unsupported construct, or
    the character the vocabulary cannot produce.
    """
    if not isinstance(regex, str):
        raise ConstraintError(f"regex must be a string, got {type(regex).__name__}")
    regex = normalize_regex(regex)
    _check_groups_balanced(regex)
    return _cache.get(regex, vocabulary)


def _check_groups_balanced(regex: str) -> None:
    """Reject unbalanced parentheses up front: wrapped as ``(?:regex)``, ``a)|(b`` would parse."""
    i, in_class, opened = 0, False, []
    while i < len(regex):
        char = regex[i]
        if char == "\\":
            i += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
            if regex[i + 1 : i + 2] == "]":
                i += 2
                continue
        elif char == "(":
            opened.append(i)
        elif char == ")":
            if not opened:
                raise ConstraintError(f"invalid regex {regex!r}: unbalanced parenthesis at position {i}")
            opened.pop()
        i += 1
    if opened:
        raise ConstraintError(f"invalid regex {regex!r}: missing ) for the group opened at position {opened[-1]}")


def compile_cache_info() -> dict[str, int]:
    """``{"hits", "misses", "size"}`` of the compile LRU (for benchmarks and tests)."""
    return {"hits": _cache.hits, "misses": _cache.misses, "size": len(_cache._entries)}


def clear_compile_cache() -> None:
    """Forget every compiled FSM (benchmarks use it to time cold compiles)."""
    _cache.clear()
