"""What a parsed regex's automaton costs: an algebra of shapes over Python's parse tree.

Each node becomes a ``Shape``: its estimated DFA states plus what the rules below need to know
about its language (which characters it may start, end or continue with, whether it can be
empty, whether one match can be the prefix of another). The rules:

* a literal costs its UTF-8 length; a class the states of its UTF-8 byte automaton
  (``[a-z]`` 1, ``[^"]`` 7, Unicode ``\\w`` ~300); sequences and alternations cost the sum
  of their parts;
* a counted repetition ``{m,n}`` costs its part ``n`` times, nested ones multiply; ``*``,
  ``+`` and ``{m,}`` loop over one copy (times ``m``);
* a count the DFA cannot read off the text costs ``n`` times more: when one repetition's
  text can also be split into a different number of repetitions (``(?:[a-z]+ ?){1,200}``,
  but not a JSON string, whose quote ends it), or when a loop over the same characters runs
  in parallel (``.*x{500}``). After such a loop *and* a character that tells its threads
  apart (``.*a.{20}``) the DFA must remember which of the last ``n`` offsets could have
  started a match: ``2**n``.

An estimate, not a DFA construction: the tests are sufficient conditions, so it errs on the
large side; only loops over a single class are tracked for the last rule.

    >>> from re import _parser
    >>> estimate(_parser.parse("(?:[a-z]+ ?){1,10}"))[0].size
    200
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from sglite.constraints import charset
from sglite.constraints.charset import EMPTY, Ranges

try:  # the stdlib regex parser: ``re._parser`` since 3.11, ``sre_parse`` before
    from re import _parser as sre
except ImportError:  # pragma: no cover - Python < 3.11
    import sre_parse as sre  # type: ignore[no-redef]

_EXPONENT_CAP = 62  # 2**62 already exceeds any limit
_UNICODE_CLASS_STATES = 50  # per character; ASCII classes cost 1, [^"] 7, \w ~300


def estimate(tree, *, ignore_case: bool = False, unanchored: bool = False) -> tuple[Shape, list[RepeatCost]]:
    """The shape of a parsed pattern and every repetition's cost (in the order of the text).

    ``unanchored`` charges the pattern as a DFA that may start a match at any offset (what
    outlines-core builds when the start sentinel cannot be used, see ``compiler``): as if a
    loop over every character came first.
    """
    estimator = _Estimator(ignore_case)
    shape, _ = estimator.sequence(tree, _Loop(charset.complement(EMPTY)) if unanchored else None)
    return shape, estimator.repeats


class RepeatCost(NamedTuple):
    """One repetition operator and what the estimate charged for it."""

    low: int
    high: int
    """``sre.MAXREPEAT`` when unbounded."""
    body: int
    """States of one copy of the repeated part."""
    cost: int
    reason: str
    """``""``, ``"ambiguous"`` (the count is not readable off the text) or ``"loop"`` (after a loop)."""
    unicode_class: bool
    """Whether the part holds a class costing many states per character (``\\w``, ``\\p{L}``)."""


@dataclass(frozen=True)
class Shape:
    """What the estimate knows about a (sub)pattern's language."""

    size: int
    chars: Ranges = EMPTY
    """Every character a match may contain."""
    first: Ranges = EMPTY
    last: Ranges = EMPTY
    not_first: Ranges = EMPTY
    """Characters that may appear after a match's first character."""
    not_last: Ranges = EMPTY
    nullable: bool = True
    nonempty: bool = False
    prefix_free: bool = True
    """No match is a proper prefix of another (so a repetition's count is unambiguous)."""
    extends: Ranges = EMPTY
    """Characters that can follow a match inside a longer match (empty when prefix-free)."""
    max_len: int = 0
    widest: int = 0
    """States of the costliest single class inside."""


_NOTHING = Shape(0)


def _char(ranges: Ranges) -> Shape:
    states = charset.utf8_states(ranges)
    return Shape(states, ranges, ranges, ranges, EMPTY, EMPTY, False, True, True, EMPTY, 1, states)


def _then(a: Shape, b: Shape) -> Shape:
    first = charset.union(a.first, b.first) if a.nullable else a.first
    not_first = charset.union(a.not_first, b.not_first, b.chars if a.nonempty else EMPTY)
    nullable = a.nullable and b.nullable
    # A closing delimiter the first part cannot continue with makes the whole prefix-free
    # (a JSON string: the quote after its characters).
    prefix_free = (a.prefix_free and b.prefix_free) or (
        b.prefix_free and not b.nullable and not charset.intersects(b.first, a.extends)
    )
    if prefix_free:
        extends = EMPTY
    elif a.prefix_free:  # both matches share the first part, so only the second can extend
        extends = b.extends
    else:
        extends = charset.union(not_first, first if nullable else EMPTY)
    return Shape(
        a.size + b.size,
        charset.union(a.chars, b.chars),
        first,
        charset.union(a.last, b.last) if b.nullable else b.last,
        not_first,
        charset.union(a.not_last, b.not_last, a.chars if b.nonempty else EMPTY),
        nullable,
        a.nonempty or b.nonempty,
        prefix_free,
        extends,
        min(a.max_len + b.max_len, _EXPONENT_CAP),
        max(a.widest, b.widest),
    )


def _either(shapes: list[Shape]) -> Shape:
    nullable, nonempty = any(s.nullable for s in shapes), any(s.nonempty for s in shapes)
    firsts = [s.first for s in shapes]
    disjoint = all(not charset.intersects(x, y) for i, x in enumerate(firsts) for y in firsts[i + 1:])
    prefix_free = all(s.prefix_free for s in shapes) and disjoint and not (nullable and nonempty)
    first, not_first = charset.union(*firsts), charset.union(*(s.not_first for s in shapes))
    extends = EMPTY if prefix_free else charset.union(not_first, first if nullable else EMPTY)
    return Shape(
        sum(s.size for s in shapes),
        charset.union(*(s.chars for s in shapes)),
        first,
        charset.union(*(s.last for s in shapes)),
        not_first,
        charset.union(*(s.not_last for s in shapes)),
        nullable,
        nonempty,
        prefix_free,
        extends,
        max(s.max_len for s in shapes),
        max(s.widest for s in shapes),
    )


def _self_delimiting(body: Shape) -> bool:
    """Whether the text of ``body{n}`` splits into repetitions one way only (a sufficient test)."""
    if body.nullable:
        return False
    return (
        body.prefix_free
        or not charset.intersects(body.first, body.not_first)  # each repetition starts with a marker
        or not charset.intersects(body.last, body.not_last)  # ... or ends with one
    )


@dataclass(frozen=True)
class _Loop:
    """An unbounded single-class loop still running in parallel with what follows it."""

    chars: Ranges
    trap: Ranges = EMPTY
    """Characters seen since the loop that only some of its threads accepted."""


class _Estimator:
    """One walk over a parse tree (see ``estimate``)."""

    def __init__(self, ignore_case: bool) -> None:
        self.ignore_case = ignore_case
        self.repeats: list[RepeatCost] = []
        """Every repetition, children before parents (the order of their quantifiers in the text)."""

    def sequence(self, items, loop: _Loop | None) -> tuple[Shape, _Loop | None]:
        shape = _NOTHING
        for op, arg in items:
            element, loop = self.element(op, arg, loop)
            shape = _then(shape, element)
        return shape, loop

    def element(self, op, arg, loop: _Loop | None) -> tuple[Shape, _Loop | None]:
        """The shape of one node, and the loop still running after it."""
        if op in (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN):
            shape = _char(self._class_ranges(op, arg))
            return shape, _carry(loop, shape)
        if op is sre.SUBPATTERN:
            return self.sequence(arg[-1], loop)
        if op is getattr(sre, "ATOMIC_GROUP", None):
            return self.sequence(arg, loop)
        if op is sre.BRANCH:
            walked = [self.sequence(branch, loop) for branch in arg[1]]
            loops = [after for _, after in walked if after is not None]
            return _either([shape for shape, _ in walked]), _merge_loops(loops)
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT, getattr(sre, "POSSESSIVE_REPEAT", sre.MAX_REPEAT)):
            return self.repeat(*arg, loop)
        return _NOTHING, loop  # anchors, lookarounds, backreferences: rejected later

    def repeat(self, low: int, high: int, items, loop: _Loop | None) -> tuple[Shape, _Loop | None]:
        body, body_loop = self.sequence(items, None)
        unbounded = high == sre.MAXREPEAT
        count = max(low, 1) if unbounded else high
        cost, reason = body.size * count, ""
        if count >= 2 and not _self_delimiting(body):
            cost, reason = cost * count, "ambiguous"
        # The loop runs beside the repetition only if it can read what every repetition starts with.
        if not unbounded and count >= 2 and loop is not None and charset.intersects(loop.chars, body.first):
            if charset.intersects(loop.trap, body.chars):
                span = min(count * max(body.max_len, 1), _EXPONENT_CAP)
                cost = max(cost, (2**span) * max(body.size // max(body.max_len, 1), 1))
            else:
                cost *= count
            reason = "loop"
        self.repeats.append(RepeatCost(low, high, body.size, cost, reason, body.widest >= _UNICODE_CLASS_STATES))
        # A prefix-free part repeated a fixed number of times splits one way only; otherwise
        # a match can continue with another repetition.
        fixed_count = (body.prefix_free and low == high and not body.nullable) or not body.nonempty
        repeated = Shape(
            cost,
            body.chars,
            body.first,
            body.last,
            charset.union(body.not_first, body.chars if count >= 2 or unbounded else EMPTY),
            charset.union(body.not_last, body.chars if count >= 2 or unbounded else EMPTY),
            low == 0 or body.nullable,
            body.nonempty,
            fixed_count,
            EMPTY if fixed_count else self._repeat_extends(body, high),
            _EXPONENT_CAP if unbounded else min(count * body.max_len, _EXPONENT_CAP),
            body.widest,
        )
        single_class = len(items) == 1 and items[0][0] in (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN)
        if unbounded and single_class:  # a new loop, running beside any older one
            return repeated, _merge_loops([lp for lp in (loop, _Loop(body.chars)) if lp is not None])
        return repeated, _merge_loops([lp for lp in (_carry(loop, repeated), body_loop) if lp is not None])

    @staticmethod
    def _repeat_extends(body: Shape, high: int) -> Ranges:
        """What may continue a match of ``body{m,high}`` into a longer one."""
        if body.prefix_free or high <= 1:  # another repetition, or a longer first one
            return charset.union(body.first, body.extends)
        return body.chars  # repetitions may split differently: anything

    def _class_ranges(self, op, arg) -> Ranges:
        if op is sre.LITERAL:
            ranges = ((arg, arg),)
        elif op is sre.NOT_LITERAL:
            ranges = charset.complement(((arg, arg),))
        elif op is sre.ANY:
            ranges = charset.complement(((10, 10),))
        else:
            negate = bool(arg) and arg[0][0] is sre.NEGATE
            parts: list[tuple[int, int]] = []
            for item, value in arg:
                if item is sre.LITERAL:
                    parts.append((value, value))
                elif item is sre.RANGE:
                    parts.append(value)
                elif item is sre.CATEGORY:
                    parts.extend(charset.category(_CATEGORIES.get(str(value), r"\w")))
            ranges = charset.merge(parts)
            if negate:
                ranges = charset.complement(ranges)
        return charset.with_ascii_case(charset.merge(ranges)) if self.ignore_case else charset.merge(ranges)


def _carry(loop: _Loop | None, element: Shape) -> _Loop | None:
    """The loop still running after ``element`` (``None`` once its threads must have died)."""
    if loop is None or not element.nonempty:
        return loop
    if not element.nullable and not charset.intersects(loop.chars, element.chars):
        return None  # the loop cannot consume what the element must: its threads die here
    if charset.covers(element.chars, loop.chars):
        return loop
    return _Loop(loop.chars, charset.union(loop.trap, element.chars))


def _merge_loops(loops: list[_Loop]) -> _Loop | None:
    if not loops:
        return None
    return _Loop(charset.union(*(lp.chars for lp in loops)), charset.union(*(lp.trap for lp in loops)))


_CATEGORIES = {
    "CATEGORY_WORD": r"\w", "CATEGORY_NOT_WORD": r"\W", "CATEGORY_SPACE": r"\s",
    "CATEGORY_NOT_SPACE": r"\S", "CATEGORY_DIGIT": r"\d", "CATEGORY_NOT_DIGIT": r"\D",
}
