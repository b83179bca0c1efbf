"""Jump-forward decoding (SGLang's compressed FSM): append text the constraint forces, unsampled.

After ``{`` a schema with required key ``name`` leaves one possible continuation, ``"name":"``;
sampling it token by token costs a model forward per token for no information. Here the
*forced bytes* of an FSM state are the longest byte string every accepted continuation from
that state starts with:

    forced(s) = ""                                         if s accepts (stopping is possible)
    forced(s) = LCP over allowed tokens t of bytes(t) + forced(next(s, t))   otherwise

The forced text is tokenized the way the model would see it (``tokenizer.encode``), checked to
walk the FSM, and falls back to a greedy longest-token walk over the vocabulary when the
tokenizer's split does not fit (e.g. a SentencePiece ``▁`` prefix).

    >>> # plan = plan_jump_forward(fsm, state, tokenizer); plan.token_ids, plan.end_state
"""

from __future__ import annotations

from dataclasses import dataclass

from sglite.constraints.compiler import CompiledFSM

MAX_FORCED_DEPTH = 256
"""States followed per forced-string computation; deeper chains are forced in later steps."""


@dataclass(frozen=True)
class JumpForwardPlan:
    """Tokens the constraint forces from a state, and the state after them."""

    token_ids: list[int]
    """Ids to append without sampling (possibly empty)."""
    end_state: int
    """The FSM state after ``token_ids``."""


def forced_bytes(fsm: CompiledFSM, state: int) -> bytes:
    """The bytes every accepted continuation from ``state`` starts with (memoized per FSM)."""
    return _forced(fsm, state, depth=0, active=set())


def _forced(fsm: CompiledFSM, state: int, depth: int, active: set[int]) -> bytes:
    known = fsm.forced_bytes.get(state)
    if known is not None:
        return known
    # A cycle or a very long chain: "" is always a safe (shorter) answer; don't memoize it.
    if state in active or depth >= MAX_FORCED_DEPTH:
        return b""
    if fsm.is_final(state):
        fsm.forced_bytes[state] = b""
        return b""
    token_bytes = fsm.vocabulary.token_bytes
    spellings = [
        (token_id, token_bytes[token_id])
        for token_id in fsm.text_tokens(state)
        if token_id < len(token_bytes) and token_bytes[token_id]
    ]
    # Cheap exact answer for most states (free text): two tokens disagree on the first byte.
    if len({spelled[0] for _, spelled in spellings}) != 1:
        fsm.forced_bytes[state] = b""
        return b""
    active.add(state)
    prefix: bytes | None = None
    exact = True  # False once a conservative "" from a cycle/cap shortened the answer
    for token_id, spelled in spellings:
        if prefix is not None and not prefix.startswith(spelled):
            # This token alone already decides how far it agrees with the prefix.
            prefix = _common_prefix(prefix, spelled)
            if not prefix:
                break
            continue
        next_state = fsm.next_state(state, token_id)
        tail = b"" if next_state is None else _forced(fsm, next_state, depth + 1, active)
        if next_state is not None and next_state not in fsm.forced_bytes:
            exact = False  # the tail was cut short by a cycle or the depth cap
        candidate = spelled + tail
        prefix = candidate if prefix is None else _common_prefix(prefix, candidate)
        if not prefix:
            break
    active.discard(state)
    result = prefix or b""
    if exact:
        fsm.forced_bytes[state] = result
    return result


def _common_prefix(a: bytes, b: bytes) -> bytes:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return a[:i]


def _complete_utf8_prefix(data: bytes) -> bytes:
    """The longest prefix that decodes as UTF-8 (a forced multibyte character may be cut off)."""
    for cut in range(len(data), max(len(data) - 4, -1), -1):
        try:
            data[:cut].decode("utf-8")
            return data[:cut]
        except UnicodeDecodeError:
            continue
    return b""


def plan_jump_forward(fsm: CompiledFSM, state: int, tokenizer) -> JumpForwardPlan:
    """The tokens forced from ``state`` and where they lead (empty when nothing is forced)."""
    forced = forced_bytes(fsm, state)
    if not forced:
        return JumpForwardPlan([], state)
    text = _complete_utf8_prefix(forced)
    if text:
        plan = _walk(fsm, state, _tokenize(tokenizer, fsm, text), text)
        if plan is not None:
            return plan
    return _greedy(fsm, state, forced)


def _tokenize(tokenizer, fsm: CompiledFSM, text: bytes) -> list[int]:
    ids = list(tokenizer.encode(text.decode("utf-8"), add_special_tokens=False))
    token_bytes = fsm.vocabulary.token_bytes
    # SentencePiece normalizers prepend "▁" to the text; drop a lone leading space token.
    if ids and ids[0] < len(token_bytes) and token_bytes[ids[0]] == b" " and not text.startswith(b" "):
        ids = ids[1:]
    return ids


def _walk(fsm: CompiledFSM, state: int, ids: list[int], text: bytes) -> JumpForwardPlan | None:
    """Follow ``ids`` from ``state``; ``None`` unless they spell exactly ``text`` inside the FSM."""
    token_bytes = fsm.vocabulary.token_bytes
    spelled = bytearray()
    for token_id in ids:
        if token_id >= len(token_bytes) or token_bytes[token_id] is None:
            return None
        next_state = fsm.next_state(state, token_id)
        if next_state is None:
            return None
        spelled += token_bytes[token_id]
        state = next_state
    if bytes(spelled) != text:
        return None
    return JumpForwardPlan(ids, state)


def _greedy(fsm: CompiledFSM, state: int, forced: bytes) -> JumpForwardPlan:
    """Cover ``forced`` with the longest allowed vocabulary token at each step."""
    ids: list[int] = []
    rest = forced
    bytes_to_ids = fsm.vocabulary.bytes_to_ids
    while rest:
        for length in range(len(rest), 0, -1):
            step = next(
                (
                    (token_id, nxt)
                    for token_id in bytes_to_ids.get(rest[:length], ())
                    if (nxt := fsm.next_state(state, token_id)) is not None
                ),
                None,
            )
            if step is not None:
                ids.append(step[0])
                state = step[1]
                rest = rest[length:]
                break
        else:
            break  # no token spells the next byte here: force what we have
    return JumpForwardPlan(ids, state)
