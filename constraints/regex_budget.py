"""How big a constraint's automaton may get, checked before outlines-core spends time on it.

outlines-core cannot be interrupted once it starts, and a short pattern can ask for millions
of DFA states (``a{20000}``, ``\\w{1,3000}``, ``(?:[a-z]+ ?){1,500}``, ``.*a.{30}``), so
``check_regex_budget`` estimates the states from Python's parse tree first (the rules are in
``regex_shape``) and refuses a pattern over ``MAX_REGEX_SIZE``, naming the repetition
responsible. Rust-only syntax is respelled for Python's parser (``\\p{..}`` is charged as
``\\w``); what it still cannot parse is charged as if every repetition nested in every other.

    >>> regex_size(r"[0-9]{4}-[0-9]{2}"), regex_size(r"(a{100}){100}"), regex_size(r"[ab]*a[ab]{10}")
    (7, 10000, 1026)
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from sglite.constraints.errors import ConstraintError
from sglite.constraints.regex_shape import RepeatCost, estimate, sre
from sglite.constraints.regex_syntax import scan


MAX_REGEX_SIZE = 8_000
"""Default largest ``regex_size`` a constraint may have (``EngineConfig.max_regex_size``, env
``SGLITE_MAX_REGEX_SIZE``, overrides it per engine).

outlines-core scans the whole vocabulary from every state, so compile time grows with the
vocabulary as well as the size: lower it for big models."""
MAX_REGEX_LENGTH = 100_000
"""Default longest regex text (characters) a constraint may have (``SGLITE_MAX_REGEX_LENGTH``)."""

_HINT = {
    "": "lower the count (a large {m,n} can often become * or +)",
    "ambiguous": "make each repetition start or end with a character the rest of it cannot match "
                 "(a separator), or lower the count",
    "loop": "separate it from the loop with a character the loop cannot match, or lower the count",
}


def check_regex_budget(
    regex: str, max_size: int | None = None, max_length: int | None = None, *, unanchored: bool = False
) -> None:
    """Raise ``ConstraintError`` if ``regex`` is longer than ``MAX_REGEX_LENGTH`` or its
    ``regex_size`` exceeds ``MAX_REGEX_SIZE`` (or the limits given). The message names the
    repetition responsible and what to change. Takes well under a second for any input.
    ``unanchored``: charge it as a DFA that may start matching anywhere (see ``regex_shape``)."""
    problem = budget_problem(regex, max_size, max_length, unanchored=unanchored)
    if problem is not None:
        raise ConstraintError(f"regex {_excerpt(regex)} is too large for a constraint FSM: {problem}")


def budget_problem(
    regex: str, max_size: int | None = None, max_length: int | None = None, *, unanchored: bool = False
) -> str | None:
    """Why ``regex`` is over budget (what ``check_regex_budget`` says after the regex), or ``None``."""
    max_size = MAX_REGEX_SIZE if max_size is None else max_size
    max_length = MAX_REGEX_LENGTH if max_length is None else max_length
    if len(regex) > max_length:
        return (
            f"it is {len(regex):,} characters long, over the limit of {max_length:,} (SGLITE_MAX_REGEX_LENGTH); "
            "shorten it"
        )
    size, worst = _estimate(regex, unanchored)
    if size <= max_size:
        return None
    over = f"over the limit of {max_size:,} (SGLITE_MAX_REGEX_SIZE)"
    if worst is None:
        return f"~{size:,} states estimated, {over}; shorten it (fewer alternatives, fewer or smaller repetitions)"
    where = f" at position {worst.position}" if worst.position is not None else ""
    why = {
        "": f"repeats a part costing ~{worst.body:,} states {worst.factor:,} times",
        "ambiguous": "repeats a part whose text can be split into a different number of repetitions, "
                     "so the automaton tracks every possible count",
        "loop": "follows a loop over the same characters, so the automaton tracks every offset the "
                "repetition could have started at",
    }[worst.reason]
    hint = _HINT[worst.reason]
    if unanchored:
        hint = "drop the (?x) or (?-u) flag, which keeps the compiler from anchoring the pattern, or " + hint
    if worst.unicode_class:
        hint += "; prefer an ASCII class such as [A-Za-z0-9_] to a Unicode one such as \\w"
    return f"repetition {worst.text}{where} {why}: ~{size:,} states in all, {over}; {hint}"


def regex_size(regex: str) -> int:
    """The estimated DFA states of ``regex`` (see the module docstring)."""
    return _estimate(regex)[0]


def _excerpt(regex: str, limit: int = 60) -> str:
    return repr(regex) if len(regex) <= limit else repr(regex[:limit]) + f"... ({len(regex):,} chars)"


@dataclass(frozen=True)
class _Repeat:
    """A repetition operator: where it is written and what it costs."""

    text: str
    position: int | None
    body: int
    """States of one copy of the repeated part."""
    factor: int
    """How many times the repetition multiplies ``body``."""
    reason: str
    """``""``, ``"ambiguous"`` (count not readable off the text) or ``"loop"`` (after a loop)."""
    unicode_class: bool
    """Whether the repeated part's characters cost many states each (``\\w``, ``\\p{L}``)."""


def _estimate(regex: str, unanchored: bool = False) -> tuple[int, _Repeat | None]:
    python = _as_python(regex)
    try:
        if _SET_SYNTAX.search(python):
            with warnings.catch_warnings():  # not thread-safe, hence only for this rare syntax
                warnings.simplefilter("ignore", FutureWarning)  # Rust class syntax such as [[:alpha:]]
                tree = sre.parse(python)
        else:
            tree = sre.parse(python)
        ignore_case = bool(re.search(r"\(\?[a-zA-Z]*i", regex)) or bool(tree.state.flags & re.I)
        shape, repeats = estimate(tree, ignore_case=ignore_case, unanchored=unanchored)
    except RecursionError:
        raise ConstraintError(f"regex {_excerpt(regex)} nests groups too deeply; flatten the nesting") from None
    except (re.error, OverflowError, ValueError):
        return _fallback_estimate(regex)
    # Blame the costliest repetition that multiplies (a "?" around everything explains nothing).
    multiplying = [r for r in repeats if r.cost >= 2 * r.body]
    if not multiplying:
        return shape.size, None
    return shape.size, _locate(regex, repeats, max(multiplying, key=lambda r: r.cost))


_SET_SYNTAX = re.compile(r"\[\[|&&|--|~~|\|\|")  # what makes Python's parser warn about nested sets


def _locate(regex: str, repeats: list[RepeatCost], worst: RepeatCost) -> _Repeat:
    """Find ``worst`` in the text: the k-th quantifier with its bounds, k its rank in ``repeats``."""
    low, high, body, cost, reason, wide = worst
    rank = [r[:2] for r in repeats[: repeats.index(worst)]].count((low, high))
    found = [q for q in _quantifiers(regex) if q[2] == (low, high)]
    factor = cost // max(body, 1)
    if rank < len(found):
        position, text, _ = found[rank]
        return _Repeat(text, position, body, factor, reason, wide)
    text = {(0, sre.MAXREPEAT): "*", (1, sre.MAXREPEAT): "+", (0, 1): "?"}.get((low, high))
    if text is None:
        text = f"{{{low},}}" if high == sre.MAXREPEAT else f"{{{low},{high}}}"
    return _Repeat(text, None, body, factor, reason, wide)


_QUANTIFIER = re.compile(r"\{(\d+)(?:(,)(\d*))?\}")


def _quantifiers(regex: str) -> list[tuple[int, str, tuple[int, int]]]:
    """``(position, text, (min, max))`` of every quantifier outside classes, in text order."""
    found = []
    previous = ""
    for position, piece, in_class in scan(regex):
        if in_class:
            previous = "]"
            continue
        if piece in ("*", "+") and previous not in ("(", "?"):
            found.append((position, piece, (0 if piece == "*" else 1, sre.MAXREPEAT)))
        elif piece == "?" and previous not in ("(", "*", "+", "?", "}"):
            found.append((position, piece, (0, 1)))
        elif piece == "{" and previous not in (r"\p", r"\P", r"\x", r"\u"):
            match = _QUANTIFIER.match(regex, position)
            if match is not None:
                low = int(match.group(1))
                high = low if match.group(2) is None else int(match.group(3)) if match.group(3) else sre.MAXREPEAT
                found.append((position, match.group(0), (low, high)))
        previous = piece
    return found


def _fallback_estimate(regex: str) -> tuple[int, _Repeat | None]:
    """For syntax Python cannot parse: every counted repetition taken as nested in every other."""
    size = len(regex.encode("utf-8", "surrogatepass"))
    worst = None
    for position, text, (low, high) in _quantifiers(regex):
        factor = max(low, 1) if high == sre.MAXREPEAT else max(high, 1)
        size *= factor
        if worst is None or factor > worst[2]:
            worst = (position, text, factor)
    if worst is None:
        return size, None
    return size, _Repeat(worst[1], worst[0], max(size // worst[2], 1), worst[2], "", False)


_FLAG_GROUP = re.compile(r"\(\?[a-zA-Z-]+\)")
# Rust spellings Python's parser lacks, each matched whole so an escaped backslash stays escaped.
_RUST_ONLY = re.compile(r"\\\\|\\([pP])(?:\{[^}]*\}|[A-Za-z])|\\[xu]\{([0-9A-Fa-f]{1,6})\}|\(\?<(?=[A-Za-z_])")


def _as_python(regex: str) -> str:
    """Respell Rust-only syntax so Python's parser accepts it (``\\p{..}`` is charged as ``\\w``)."""

    def respell(match: re.Match) -> str:
        if match.group(1):
            return r"\w" if match.group(1) == "p" else r"\W"
        if match.group(2):
            return f"\\U{int(match.group(2), 16):08X}"
        return "(?P<" if match.group(0) == "(?<" else match.group(0)

    python = _RUST_ONLY.sub(respell, regex)
    # Python allows inline flags only at the very start; they do not change the size.
    leading = _FLAG_GROUP.match(python)
    keep = leading.group(0) if leading and set(leading.group(0)[2:-1]) <= set("aimsux") else ""
    return keep + _FLAG_GROUP.sub("", python[len(keep):])
