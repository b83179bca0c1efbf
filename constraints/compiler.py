"""Constraint source -> regex -> cached token-level FSM (an outlines-core ``Index``).

Regex syntax and its error messages live in ``regex_syntax``. Compiling is the slow part (a
DFA over the whole vocabulary): ``regex_budget`` refuses patterns whose automaton would be too
large before outlines-core starts. ``FSMCaches`` (owned by one engine's backend, never
module-level) keeps compiled ``CompiledFSM``s, keyed by a digest of (regex, vocabulary) and
bounded in bytes, and per FSM state the 0/-inf logit bias the step loop adds with one ``add_``.

    >>> import re
    >>> rx = regex_for_choices(["yes", "no", "a.b"])
    >>> rx, bool(re.fullmatch(rx, "a.b")), bool(re.fullmatch(rx, "axb"))
    ('(?:yes|no|a\\\\.b)', True, False)
"""

from __future__ import annotations

import itertools
import re
import threading

import torch
from outlines_core import Index
from outlines_core import json_schema as oc_json

from sglite.constraints.byte_cache import ByteLRU, digest
from sglite.constraints.errors import ConstraintError
from sglite.constraints.spec import check_choices
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


def regex_for_choices(choices: list[str] | tuple[str, ...], max_bytes: int = MAX_REGEX_SIZE) -> str:
    """An alternation matching exactly one of ``choices`` (each taken literally), at most ``max_bytes`` long."""
    check_choices(choices)
    unique = list(dict.fromkeys(choices))  # the DFA accepts the union, so order is cosmetic
    # The alternation's regex_size is at most its UTF-8 length: refuse before building it.
    total = sum(len(c.encode("utf-8", "surrogatepass")) for c in unique)
    if total > max_bytes:
        raise ConstraintError(
            f"choices: {len(unique):,} distinct strings totalling {total:,} bytes are too many for a constraint "
            f"(limit {max_bytes:,} bytes); pass fewer or shorter choices"
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

    def __init__(self, regex: str, vocabulary: TokenVocabulary, index: Index, biases: ByteLRU | None = None) -> None:
        self.regex = regex
        self.biases: ByteLRU[torch.Tensor] = biases if biases is not None else ByteLRU(BIAS_CACHE_BYTES)
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

        Added to the logits rather than used with ``masked_fill_``: on CPU a bool-mask fill is a slow
        scalar pass, an add is vectorized (on GPUs both are a single fast kernel).
        """
        key = (self._serial, state, width, device, dtype)
        bias = self.biases.get(key)
        if bias is None:
            allowed = torch.tensor([t for t in self.allowed_tokens(state) if t < width], dtype=torch.long)
            bias = torch.full((width,), float("-inf"), dtype=dtype)
            bias[allowed] = 0
            bias = bias.to(device)
            self.biases.put(key, bias, bias.numel() * bias.element_size())
        return bias


BIAS_CACHE_BYTES = 256 << 20
"""Default memory for cached per-state logit biases (4 bytes a token in float32)."""
_fsm_serials = itertools.count()  # an id per CompiledFSM (immutable counter, not a cache)


def _with_sentinels(regex: str, confined: str | None) -> str:
    """What outlines-core compiles for ``regex`` (see ``CompiledFSM``)."""
    inner = regex if confined is None else confined
    # In verbose mode a trailing "# comment" would swallow the closing parenthesis.
    if re.search(r"\(\?[a-zA-Z-]*x", regex):
        inner += "\n"
    return f"\\x{{{ord(START_SENTINEL):X}}}(?:{inner})\\x{{{ord(ACCEPT_SENTINEL):X}}}"


class FSMCaches:
    """Compiled FSMs and their per-state biases, both bounded in bytes; one compile per key at a time.

    Owned by one backend (one engine): two engines in a process share nothing.
    """

    def __init__(self, compiled_bytes: int = 256 << 20, bias_bytes: int = BIAS_CACHE_BYTES,
                 max_regex_size: int = MAX_REGEX_SIZE, max_regex_length: int = MAX_REGEX_LENGTH) -> None:
        self.compiled: ByteLRU[CompiledFSM] = ByteLRU(compiled_bytes)
        self.biases: ByteLRU[torch.Tensor] = ByteLRU(bias_bytes)
        self.max_regex_size = max_regex_size
        self.max_regex_length = max_regex_length
        self._lock = threading.Lock()
        self._building: dict[str, threading.Lock] = {}

    def get(self, regex: str, vocabulary: TokenVocabulary) -> CompiledFSM:
        key = digest(regex, repr(vocabulary.key))
        fsm = self.compiled.get(key)
        if fsm is not None:
            return fsm
        with self._lock:
            build_lock = self._building.setdefault(key, threading.Lock())
        # Compile outside the cache lock so other constraints proceed; the per-key lock stops
        # two threads compiling the same regex twice.
        with build_lock:
            fsm = self.compiled.get(key)
            if fsm is not None:
                return fsm
            try:
                index = _build_index(regex, vocabulary, self.max_regex_size, self.max_regex_length)
            finally:
                with self._lock:
                    self._building.pop(key, None)
            fsm = CompiledFSM(regex, vocabulary, index, self.biases)
            # The serialized index is its transition table: a fair measure of its memory.
            self.compiled.put(key, fsm, len(index.__reduce__()[1][0]) + 2 * len(regex))
            return fsm

    def info(self) -> dict[str, dict[str, int]]:
        return {"compiled": self.compiled.info(), "bias": self.biases.info()}

    def clear(self) -> None:
        self.compiled.clear()
        self.biases.clear()


def _build_index(regex: str, vocabulary: TokenVocabulary, max_size: int, max_length: int) -> Index:
    confined = exclude_sentinel_plane(regex)
    # Before the expensive part, which cannot be interrupted. A regex whose classes cannot be
    # confined (verbose mode, say) still compiles correctly, since the sentinels are never
    # offered as text tokens, but its DFA tracks every offset a match could start at.
    check_regex_budget(regex, max_size, max_length, unanchored=confined is None)
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


def compile_fsm(regex: str, vocabulary: TokenVocabulary, caches: FSMCaches | None = None) -> CompiledFSM:
    """The ``CompiledFSM`` of ``regex`` over ``vocabulary``, from ``caches`` (compiled on a miss;
    without ``caches``, compiled afresh with default limits).

    Raises ``ConstraintError`` naming the position of an invalid or unsupported construct,
    the character the vocabulary cannot produce, or the part that makes the automaton larger
    than the regex budget (``regex_budget``).
    """
    caches = caches if caches is not None else FSMCaches()
    if not isinstance(regex, str):
        raise ConstraintError(f"regex must be a string, got {type(regex).__name__}")
    if len(regex) > caches.max_regex_length:
        check_regex_budget(regex, caches.max_regex_size, caches.max_regex_length)  # raises before normalizing
    regex = normalize_regex(regex)
    check_groups_balanced(regex)
    return caches.get(regex, vocabulary)
