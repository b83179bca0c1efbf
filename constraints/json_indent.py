"""Indented JSON (``json_layout="indent2"``/``"indent4"``): exactly ``json.dumps(obj, indent=n)``'s whitespace.

The grammar (llguidance) enforces the schema on the *canonical* text, ``json.dumps`` with
``separators=(",", ": ")`` and no newlines. Indentation depends on depth, which a fixed
separator cannot say, so a small layout machine sits beside the grammar and sees the text the
model writes: after an opener either the matching closer (``{}``, ``[]``) or a newline plus the
next indent; after ``,`` a newline plus the indent; before the closer of a non-empty container a
newline plus the outer indent. Layout whitespace goes only to the machine (it is forced by
jump-forward once chosen), every other token to the grammar too, so a token allowed is one the
grammar allows and the layout machine accepts, or whitespace the layout needs here.

    >>> state = LayoutState.start(2)
    >>> for text in ('{', '\\n  ', '"a": [', ']', ',', '\\n  ', '"b": 1', '\\n', '}'):
    ...     state = state.advance(text)
    >>> state.finished
    True
    >>> LayoutState.start(2).advance('{"a"') is None   # a newline must follow the opener
    True
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

CLOSERS = {"{": "}", "[": "]"}
OPENED, PENDING, NORMAL, CLOSING = range(4)


@dataclass(frozen=True)
class LayoutState:
    """Where the text stands in ``json.dumps(obj, indent=n)``'s layout."""

    indent: int
    stack: str = ""
    """Open containers, outermost first (``"{["``)."""
    mode: int = NORMAL
    """``OPENED`` (just opened), ``PENDING`` (layout whitespace ``pending`` to write), ``NORMAL``, or
    ``CLOSING`` (the closer must come next)."""
    pending: str = ""
    then_closing: bool = False
    """When ``pending`` runs out: ``CLOSING`` (True) or ``NORMAL``."""
    in_string: bool = False
    escape: bool = False
    started: bool = False
    fresh: bool = False
    """On a new member's line, nothing written yet (no closing newline may come)."""

    @classmethod
    def start(cls, indent: int) -> LayoutState:
        return cls(indent)

    @property
    def finished(self) -> bool:
        """A whole top-level value written and no layout owed."""
        return self.started and not self.stack and self.mode == NORMAL and not self.in_string

    def newline_target(self) -> str | None:
        """The layout whitespace a newline would start here, or None if no newline may come."""
        if self.in_string:
            return None
        if self.mode == PENDING:
            return self.pending
        if self.mode == OPENED:
            return "\n" + " " * (self.indent * len(self.stack))
        if self.mode == NORMAL and self.stack and not self.fresh:
            return "\n" + " " * (self.indent * (len(self.stack) - 1))
        return None

    def advance(self, text: str) -> LayoutState | None:
        """The state after ``text``, or None if ``text`` breaks the layout."""
        state = self
        for char in text:
            state = state._step(char)
            if state is None:
                return None
        return state

    def _step(self, char: str) -> LayoutState | None:
        if self.in_string:
            if self.escape:
                return replace(self, escape=False)
            if char == "\\":
                return replace(self, escape=True)
            return replace(self, in_string=False) if char == '"' else self
        if self.mode == PENDING:
            if not self.pending.startswith(char):
                return None
            rest = self.pending[1:]
            if rest:
                return replace(self, pending=rest)
            return replace(self, pending="", mode=CLOSING if self.then_closing else NORMAL,
                           fresh=not self.then_closing)
        if self.mode == OPENED:
            if char == CLOSERS[self.stack[-1]]:
                return replace(self, stack=self.stack[:-1], mode=NORMAL)
            if char == "\n":
                return replace(self, mode=PENDING, pending=" " * (self.indent * len(self.stack)), then_closing=False) \
                    if self.indent else replace(self, mode=NORMAL)
            return None
        if self.mode == CLOSING:
            return replace(self, stack=self.stack[:-1], mode=NORMAL) if char == CLOSERS[self.stack[-1]] else None
        # NORMAL: canonical text
        if char == "\n":
            if not self.stack or self.fresh:
                return None
            pad = " " * (self.indent * (len(self.stack) - 1))
            return replace(self, mode=PENDING, pending=pad, then_closing=True) if pad else replace(self, mode=CLOSING)
        if char in "}]":
            return None  # a non-empty container closes on its own line
        if char == ",":
            return replace(self, mode=PENDING, pending="\n" + " " * (self.indent * len(self.stack)), then_closing=False)
        if char in "{[":
            return replace(self, stack=self.stack + char, mode=OPENED, started=True, fresh=False)
        if char == '"':
            return replace(self, in_string=True, started=True, fresh=False)
        if char in " \t\r":
            return self if char == " " else None  # the space after ':' is canonical (the grammar checks it)
        return replace(self, started=True, fresh=False) if not self.started or self.fresh else self


class TokenTable:
    """Per-vocabulary facts the indent processor needs, built once per backend (lazily)."""

    def __init__(self, lltokenizer, mask_words: int) -> None:
        size = lltokenizer.vocab_size
        self.texts: list[str] = []
        in_string = np.zeros(mask_words * 32, dtype=bool)
        outside = np.zeros(mask_words * 32, dtype=bool)
        self.whitespace: dict[str, int] = {}
        for token in range(size):
            text = lltokenizer.decode_bytes([token]).decode("utf-8", errors="replace")
            self.texts.append(text)
            in_string[token] = '"' in text or "\\" in text
            outside[token] = any(c in text for c in '{}[],"\\: \n')
            if text and set(text) <= {" ", "\n"} and not lltokenizer.is_special_token(token):
                self.whitespace.setdefault(text, token)
        self.in_string_words = np.packbits(in_string, bitorder="little").view(np.int32)
        self.outside_words = np.packbits(outside, bitorder="little").view(np.int32)

    def spell(self, whitespace: str) -> list[int]:
        """Token ids writing ``whitespace`` (longest tokens first)."""
        ids, rest = [], whitespace
        while rest:
            for end in range(len(rest), 0, -1):
                token = self.whitespace.get(rest[:end])
                if token is not None:
                    ids.append(token)
                    rest = rest[end:]
                    break
            else:
                return []
        return ids


def layout_mask(state: LayoutState, table: TokenTable, mask: np.ndarray, eos_ids: frozenset[int]) -> None:
    """Narrow the grammar's bitmask ``mask`` (int32 words, in place) to tokens the layout allows here."""
    bits = mask.view(np.uint8)
    target = state.newline_target()
    if state.mode == PENDING:
        mask[:] = 0  # only the owed whitespace, added below
    else:
        # Opened or closing, every token matters; otherwise only those with a character the layout reads.
        sensitive = mask.copy() if state.mode in (OPENED, CLOSING) else \
            mask & (table.in_string_words if state.in_string else table.outside_words)
        candidates = [t for t in np.nonzero(np.unpackbits(sensitive.view(np.uint8), bitorder="little"))[0].tolist()
                      if t not in eos_ids and t < len(table.texts)]
        closer = CLOSERS[state.stack[-1]] if state.stack else None
        grammar_closes = closer is not None and any(table.texts[t].startswith(closer) for t in candidates)
        grammar_continues = any(not table.texts[t].startswith(closer or "\0") for t in candidates)
        for token in candidates:
            if state.advance(table.texts[token]) is None:
                bits[token // 8] &= ~(1 << (token % 8)) & 0xFF
        if (state.mode == OPENED and not grammar_continues) or (state.mode == NORMAL and not grammar_closes):
            target = None  # a newline would open a member the grammar cannot start, or close what it cannot
    if target:
        for text, token in table.whitespace.items():
            if target.startswith(text) and (state.mode == PENDING or text.startswith("\n")):
                bits[token // 8] |= 1 << (token % 8)


class IndentedProcessor:
    """A grammar processor (``GuidanceLogitsProcessor``) plus the layout machine: the model writes
    indented JSON, the grammar reads it without the layout whitespace."""

    def __init__(self, inner, table: TokenTable, indent: int, jump_forward: bool = True) -> None:
        self.inner = inner
        self.table = table
        self.layout = LayoutState.start(indent)
        self.warnings = inner.warnings
        self.checker = inner.checker
        self.jump_forward = jump_forward
        self.jump_forward_tokens = 0

    @property
    def violation(self) -> str | None:
        return self.inner.violation

    def mask_logits(self, logits) -> None:
        inner = self.inner
        inner.matcher.unsafe_compute_mask_ptr(inner._mask.ctypes.data, inner._mask.nbytes)
        if not inner.matcher.is_error():
            layout_mask(self.layout, self.table, inner._mask, inner.backend.eos_token_ids)
            if not self.layout.finished:
                bits = inner._mask.view(np.uint8)
                for t in inner.backend.eos_token_ids:
                    if t < inner._mask.nbytes * 8:
                        bits[t // 8] &= ~(1 << (t % 8)) & 0xFF
        inner._apply(logits)

    def _is_layout(self, token_id: int) -> bool:
        text = self.table.texts[token_id] if token_id < len(self.table.texts) else ""
        return bool(text) and text in self.table.whitespace and (
            self.layout.mode in (OPENED, PENDING) or text.startswith("\n"))

    def accept_token(self, token_id: int) -> None:
        if self.is_finished():
            return
        token_id = int(token_id)
        if token_id in self.inner.backend.eos_token_ids:
            self.inner.accept_token(token_id)
            return
        text = self.table.texts[token_id] if token_id < len(self.table.texts) else ""
        layout_token = self._is_layout(token_id)
        advanced = self.layout.advance(text)
        if advanced is None:
            self.inner.violation = f"token {token_id} ({text!r}) breaks the indented layout"
            return
        self.layout = advanced
        if not layout_token:
            self.inner.accept_token(token_id)

    def is_finished(self) -> bool:
        return self.inner.is_finished()

    def forced_tokens(self) -> list[int]:
        """The layout whitespace owed (after ``,`` or a chosen newline), spelled in whitespace tokens."""
        if not self.jump_forward or self.is_finished() or self.layout.mode != PENDING:
            return []
        forced = self.table.spell(self.layout.pending)
        for token in forced:
            self.layout = self.layout.advance(self.table.texts[token])
        self.jump_forward_tokens += len(forced)
        return forced

    def is_accepting(self) -> bool:
        return self.inner.is_accepting() and self.layout.finished
