"""Constraint source -> regex -> cached token-level FSM (an outlines-core ``Index``).

Regex syntax and its error messages live in ``regex_syntax``. Compiling is the slow part (a
DFA over the whole vocabulary): ``regex_budget`` refuses patterns whose automaton would be too
large before outlines-core starts, and ``compile_fsm`` keeps an LRU of ``CompiledFSM`` keyed by
(regex, vocabulary); per FSM state, the 0/-inf logit bias the step loop adds with one ``add_``
is cached too (in one byte-bounded LRU shared by all FSMs).

    >>> import re
    >>> rx = regex_for_choices(["yes", "no", "a.b"])
    >>> rx, bool(re.fullmatch(rx, "a.b")), bool(re.fullmatch(rx, "axb"))
    ('(?:yes|no|a\\\\.b)', True, False)
"""

from __future__ import annotations

import itertools
import re
import threading
from collections import OrderedDict

import torch
from outlines_core import Index
from outlines_core import json_schema as oc_json

from sglite.constraints.errors import ConstraintError
from sglite.constraints.regex_budget import MAX_REGEX_LENGTH, MAX_REGEX_SIZE, check_regex_budget
from sglite.constraints.regex_syntax import (
    check_groups_balanced,
    diagnose_regex,
    exclude_sentinel_plane,
    find_unsupported,
    normalize_regex,
)
from sglite.constraints.vocabulary import (
    ACCEPT_SENTINEL,
    ACCEPT_SENTINEL_ID,
    START_SENTINEL,
    START_SENTINEL_ID,
    TokenVocabulary,
)

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
    # The alternation's regex_size is at most its UTF-8 length: refuse before building it.
    total = sum(len(c.encode("utf-8", "surrogatepass")) for c in unique)
    if total > MAX_REGEX_SIZE:
        raise ConstraintError(
            f"choices: {len(unique):,} distinct strings totalling {total:,} bytes are too many for a constraint "
            f"FSM (limit {MAX_REGEX_SIZE:,} bytes, SGLITE_MAX_REGEX_SIZE); pass fewer or shorter choices"
        )
    return "(?:" + "|".join(re.escape(c) for c in unique) + ")"


class CompiledFSM:
    """The token-level automaton of one regex over one vocabulary, plus per-state caches.

    Shared by every request using the same constraint; its caches are filled lazily from the
    step loop (plain dict writes, safe under the GIL).

    The index is built for ``START_SENTINEL (?:regex) ACCEPT_SENTINEL``, with plane 16 (the
    sentinels' plane, which no token spells) removed from the regex's classes:

    * a state accepts iff the accept sentinel leads to one of outlines-core's final states.
      Why: outlines-core 0.2.14 reads regex-automata's one-byte-delayed match flag as "match
      here", so it drops every token that ends one byte after a complete match without itself
      completing one (``ab(cd)?`` never reaches ``abcd``; ``12`` never continues with ``.``).
      With the sentinel no real token can complete a match, so no transition is lost;
    * the initial state is the one after the start sentinel. Why: outlines-core builds its
      DFA with an unanchored start too, whose states track every offset a match could have
      begun at: quadratic for ``a{5000}``, exponential for a JSON string with ``maxLength``
      (``maxLength: 18`` took 20 s). A match can only begin at the start sentinel, and the
      regex cannot consume it, so every earlier attempt dies there and the unanchored half
      of the DFA is no bigger than the anchored one.
    """

    def __init__(self, regex: str, vocabulary: TokenVocabulary, index: Index) -> None:
        self.regex = regex
        self.vocabulary = vocabulary
        self.index = index
        initial_state = index.get_next_state(index.get_initial_state(), START_SENTINEL_ID)
        if initial_state is None:
            raise ConstraintError(f"internal: regex {regex!r} compiled without its start sentinel")
        self.initial_state: int = initial_state
        self._sentinel_finals = frozenset(index.get_final_states())
        self._excluded = frozenset(
            {START_SENTINEL_ID, ACCEPT_SENTINEL_ID, vocabulary.outlines.get_eos_token_id()}
        )
        self._serial = next(_fsm_serials)  # keys this FSM's masks in the shared cache
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

    def logit_bias(self, state: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """A cached ``[width]`` tensor: 0 where ``state`` allows a token, ``-inf`` elsewhere.

        Added to the logits rather than used with ``masked_fill_``: on CPU a bool-mask fill of a
        150k row takes ~0.8 ms, a vectorized add ~0.03 ms (on GPUs both are a single fast kernel).
        """
        key = (self._serial, state, width, device, dtype)
        bias = _bias_cache.get(key)
        if bias is None:
            allowed = torch.tensor([t for t in self.allowed_tokens(state) if t < width], dtype=torch.long)
            bias = torch.full((width,), float("-inf"), dtype=dtype)
            bias[allowed] = 0
            bias = bias.to(device)
            _bias_cache.put(key, bias)
        return bias

    def disallowed_mask(self, state: int, width: int, device: torch.device) -> torch.Tensor:
        """``[width]`` bool tensor, True where ``state`` forbids a token (built from ``logit_bias``)."""
        return torch.isinf(self.logit_bias(state, width, device, torch.float32))


class _BiasCache:
    """One LRU of per-state logit biases for all FSMs, bounded in bytes."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple) -> torch.Tensor | None:
        with self._lock:
            bias = self._entries.get(key)
            if bias is not None:
                self._entries.move_to_end(key)
            return bias

    def put(self, key: tuple, bias: torch.Tensor) -> None:
        size = bias.numel() * bias.element_size()
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = bias
            self._bytes += size
            while self._bytes > self.budget_bytes and len(self._entries) > 1:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.numel() * evicted.element_size()


BIAS_CACHE_BYTES = 256 << 20
"""Memory for cached per-state logit biases across all FSMs (4 bytes a token in float32)."""
_bias_cache = _BiasCache(BIAS_CACHE_BYTES)
_fsm_serials = itertools.count()


def _with_sentinels(regex: str, confined: str | None) -> str:
    """What outlines-core compiles for ``regex`` (see ``CompiledFSM``)."""
    inner = regex if confined is None else confined
    # In verbose mode a trailing "# comment" would swallow the closing parenthesis.
    if re.search(r"\(\?[a-zA-Z-]*x", regex):
        inner += "\n"
    return f"\\x{{{ord(START_SENTINEL):X}}}(?:{inner})\\x{{{ord(ACCEPT_SENTINEL):X}}}"


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
                index = _build_index(regex, vocabulary)
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


def _build_index(regex: str, vocabulary: TokenVocabulary) -> Index:
    confined = exclude_sentinel_plane(regex)
    # Before the expensive part, which cannot be interrupted. A regex whose classes cannot be
    # confined (verbose mode, say) still compiles correctly, since the sentinels are never
    # offered as text tokens, but its DFA tracks every offset a match could start at.
    check_regex_budget(regex, unanchored=confined is None)
    try:
        return Index(_with_sentinels(regex, confined), vocabulary.outlines)
    except (ValueError, RuntimeError, OverflowError) as exc:
        message = str(exc)
        if "incompatible" in message and find_unsupported(regex)[0] is None:
            missing = re.search(r"characters: (\[.*?\])", message)
            raise ConstraintError(
                f"the tokenizer cannot spell regex {regex!r}: no token produces "
                f"{missing.group(1) if missing else 'some required character'}"
            ) from None
        raise diagnose_regex(regex, message) from None


_cache = _CompileCache(capacity=64)


def compile_fsm(regex: str, vocabulary: TokenVocabulary) -> CompiledFSM:
    """The cached ``CompiledFSM`` of ``regex`` over ``vocabulary`` (compiling it on a miss).

    Raises ``ConstraintError`` naming the position of an invalid or unsupported construct,
    the character the vocabulary cannot produce, or the part that makes the automaton larger
    than ``regex_budget.MAX_REGEX_SIZE``.
    """
    if not isinstance(regex, str):
        raise ConstraintError(f"regex must be a string, got {type(regex).__name__}")
    if len(regex) > MAX_REGEX_LENGTH:
        check_regex_budget(regex)  # raises: too long to be worth normalizing first
    regex = normalize_regex(regex)
    check_groups_balanced(regex)
    return _cache.get(regex, vocabulary)


def compile_cache_info() -> dict[str, int]:
    """``{"hits", "misses", "size"}`` of the compile LRU (for benchmarks and tests)."""
    return {"hits": _cache.hits, "misses": _cache.misses, "size": len(_cache._entries)}


def clear_compile_cache() -> None:
    """Forget every compiled FSM (benchmarks use it to time cold compiles)."""
    _cache.clear()
