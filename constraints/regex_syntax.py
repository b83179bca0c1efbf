"""What a constraint regex may say, how it is tidied for the FSM, and errors that name positions.

The flavour is Rust's ``regex`` crate (what outlines-core compiles): Python's common syntax,
plus ``\\p{L}``-style classes; lookarounds, backreferences, word boundaries and anchors inside
the pattern have no DFA and are rejected. A leading ``^`` and trailing ``$`` are dropped (a
constraint always matches the whole output) and ``\\d`` means ``[0-9]``, not every Unicode digit.
``exclude_sentinel_plane`` takes plane 16 out of every class for the compiler's sentinels.

    >>> normalize_regex(r"^\\d{3}$")
    '[0-9]{3}'
    >>> str(diagnose_regex("ab(?=c)", ""))[:40]
    "regex 'ab(?=c)' uses a lookahead at posi"
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from sglite.constraints.errors import ConstraintError

# Group openings a DFA cannot express.
_UNSUPPORTED_GROUPS = (
    ("(?=", "lookahead"), ("(?!", "negative lookahead"), ("(?<=", "lookbehind"),
    ("(?<!", "negative lookbehind"), ("(?P=", "named backreference"),
)


def scan(regex: str) -> Iterator[tuple[int, str, bool]]:
    """Yield ``(position, piece, in_class)``: each piece is one character or one ``\\x`` escape.

    ``in_class`` is True inside ``[...]`` (brackets included); a ``]`` right after ``[`` or
    ``[^`` is literal, as in both Python and Rust.
    """
    i, in_class = 0, False
    while i < len(regex):
        if regex[i] == "\\" and i + 1 < len(regex):
            yield i, regex[i : i + 2], in_class
            i += 2
            continue
        char = regex[i]
        if in_class:
            yield i, char, True
            in_class = char != "]"
            i += 1
            continue
        if char != "[":
            yield i, char, False
            i += 1
            continue
        yield i, char, True
        in_class, i = True, i + 1
        for literal in ("^", "]"):
            if regex[i : i + 1] == literal:
                yield i, literal, True
                i += 1


def normalize_regex(regex: str) -> str:
    """The regex handed to outlines-core: outer anchors dropped, ``\\d`` made ASCII."""
    out = []
    for _, piece, in_class in scan(strip_anchors(regex)):
        out.append(("0-9" if in_class else "[0-9]") if piece == r"\d" else piece)
    return "".join(out)


def strip_anchors(regex: str) -> str:
    """Drop a leading ``^`` / ``\\A`` and a trailing unescaped ``$`` / ``\\z``."""
    if regex.startswith("^"):
        regex = regex[1:]
    elif regex.startswith(r"\A"):
        regex = regex[2:]
    last = None
    for position, piece, in_class in scan(regex):
        last = (position, piece, in_class)
    if last is not None and not last[2] and last[1] in ("$", r"\z"):
        regex = regex[: last[0]]
    return regex


def check_groups_balanced(regex: str) -> None:
    """Reject unbalanced parentheses up front: wrapped as ``(?:regex)``, ``a)|(b`` would parse."""
    opened: list[int] = []
    for position, piece, in_class in scan(regex):
        if in_class:
            continue
        if piece == "(":
            opened.append(position)
        elif piece == ")":
            if not opened:
                raise ConstraintError(f"invalid regex {regex!r}: unbalanced parenthesis at position {position}")
            opened.pop()
    if opened:
        raise ConstraintError(f"invalid regex {regex!r}: missing ) for the group opened at position {opened[-1]}")


def find_unsupported(regex: str) -> tuple[int | None, str]:
    """``(position, what)`` of the first construct without a DFA, or ``(None, "")``."""
    for position, piece, in_class in scan(regex):
        if in_class:
            continue
        if piece in (r"\b", r"\B"):
            return position, r"word boundary \b"
        if len(piece) == 2 and piece[0] == "\\" and piece[1] in "123456789":
            return position, "backreference"
        if piece in (r"\A", r"\z", r"\Z", "^", "$"):
            return position, f"anchor {piece}"
        if piece == "(":
            for prefix, what in _UNSUPPORTED_GROUPS:
                if regex.startswith(prefix, position):
                    return position, what
    return None, ""


def diagnose_regex(regex: str, detail: str) -> ConstraintError:
    """A ``ConstraintError`` naming where ``regex`` goes wrong (``detail``: outlines-core's message)."""
    position, what = find_unsupported(regex)
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


# ---- confining classes to text (see compiler.CompiledFSM) ---------------------------------

SENTINEL_PLANE = r"\x{100000}-\x{10FFFF}"
"""Plane 16, where the compiler's sentinels live; no token can spell it (lead byte 0xF4)."""

_FLAG_GROUP = re.compile(r"\(\?([a-zA-Z-]*)([:)])")
_ESCAPE_WITH_BRACES = re.compile(r"\\[xuUpP]\{[^}]*\}|\\[pP].|\\.", re.DOTALL)
_POSIX_CLASS = re.compile(r"\[:\^?[a-z]+:\]")
_PLANE_ESCAPES = ("\\P", "\\p", "\\W", "\\S", "\\D")  # escapes whose class may reach plane 16


def exclude_sentinel_plane(regex: str) -> str | None:
    """``regex`` with plane 16 removed from every class, ``.`` and ``\\W``-like escape.

    Nothing a tokenizer produces changes, but a pattern that cannot consume the start sentinel
    lets the compiled DFA forget every match attempt begun before it (see ``compiler``).
    ``None`` when the pattern is not safe to rewrite (verbose or non-Unicode mode, or a class
    this scanner cannot close); the caller then compiles it unchanged.

        >>> exclude_sentinel_plane(r'"[^"]*"')
        '"[[^"]--[\\\\x{100000}-\\\\x{10FFFF}]]*"'
    """
    out: list[str] = []
    flags: set[str] = set()
    saved: list[set[str]] = []
    i = 0
    while i < len(regex):
        char = regex[i]
        if char == "\\":
            escape = _ESCAPE_WITH_BRACES.match(regex, i)
            if escape is None:
                return None  # a trailing backslash: invalid anyway
            text = escape.group(0)
            out.append(f"[{text}--[{SENTINEL_PLANE}]]" if text.startswith(_PLANE_ESCAPES) else text)
            i = escape.end()
        elif char == "[":
            end = _class_end(regex, i)
            if end is None:
                return None
            out.append(f"[{regex[i:end]}--[{SENTINEL_PLANE}]]")
            i = end
        elif char == ".":
            newline = "" if "s" in flags else ("\\r\\n" if "R" in flags else "\\n")
            out.append(f"[^{newline}{SENTINEL_PLANE}]")
            i += 1
        elif char == "(":
            group = _FLAG_GROUP.match(regex, i)
            if group is None or group.group(1).startswith(("P", "<")):
                saved.append(set(flags))  # a plain, named or lookaround group
                out.append(char)
                i += 1
                continue
            on, _, off = group.group(1).partition("-")
            if "x" in on or "u" in off:
                return None  # comments and byte classes would need a different rewrite
            if group.group(2) == ":":
                saved.append(set(flags))
            flags = (flags | set(on)) - set(off)
            out.append(group.group(0))
            i = group.end()
        elif char == ")":
            if saved:
                flags = saved.pop()
            out.append(char)
            i += 1
        else:
            out.append(char)
            i += 1
    return "".join(out)


def _class_end(regex: str, start: int) -> int | None:
    """Index just past the class opened at ``start`` (Rust rules: nested ``[..]`` and POSIX)."""
    i = start + 1
    if regex.startswith("^", i):
        i += 1
    if regex.startswith("]", i):
        i += 1  # a leading ] is literal
    while i < len(regex):
        char = regex[i]
        if char == "\\":
            escape = _ESCAPE_WITH_BRACES.match(regex, i)
            if escape is None:
                return None
            i = escape.end()
        elif char == "[":
            posix = _POSIX_CLASS.match(regex, i)
            if posix is not None:
                i = posix.end()
                continue
            nested = _class_end(regex, i)
            if nested is None:
                return None
            i = nested
        elif char == "]":
            return i + 1
        else:
            i += 1
    return None
