"""JSON Schema's ``pattern`` dialect (ECMA-262) rewritten for the grammar's lexer (Rust ``regex``).

A schema's ``pattern`` and ``patternProperties`` keys are ECMA regexes; llguidance compiles Rust
regexes. Most of the two agree; the differences a real schema hits are ECMA's ASCII-only ``\\d``
``\\w`` (Unicode in Rust), ``[^]`` (any character), ``\\cX`` controls, ``\\u{...}``/``\\uXXXX``
escapes, ``(?<name>...)`` groups and ``\\/`` (legal in ECMA, a no-op). Lookarounds and
backreferences (and anchors inside the pattern, word boundaries) have no finite automaton here:
``to_rust`` returns ``None`` for them, so the caller
relaxes that keyword and checks the finished output instead of refusing the schema.

    >>> to_rust(r"^\\d{3}-\\w+$")
    '^[0-9]{3}-[0-9A-Za-z_]+$'
    >>> to_rust(r"^(?!io)") is None
    True
"""

from __future__ import annotations

import re

from sglite.constraints.regex_syntax import scan

_CLASS_ESCAPES = {r"\d": "0-9", r"\w": "0-9A-Za-z_", r"\s": r"\s"}
_NEGATED = {r"\D": "[^0-9]", r"\W": "[^0-9A-Za-z_]"}
_UNTRANSLATABLE_GROUPS = ("(?=", "(?!", "(?<=", "(?<!")
_BRACED_UNICODE = re.compile(r"\\u\{([0-9A-Fa-f]{1,6})\}")
_NAMED_GROUP = re.compile(r"(?<!\\)\(\?<([A-Za-z_][A-Za-z0-9_]*)>")
_CONTROL = re.compile(r"(?<!\\)\\c([A-Za-z])")


def ecma_compiles(pattern: str) -> bool:
    """Whether ``pattern`` is a well-formed regex (checked with Python's engine, named groups adapted):
    a pattern that is, yet fails in Rust's engine, is relaxed rather than refused."""
    try:
        re.compile(_NAMED_GROUP.sub(r"(?P<\1>", pattern))
    except (re.error, RecursionError, OverflowError):
        return False
    return True


def to_rust(pattern: str) -> str | None:
    """``pattern`` (ECMA-262, as JSON Schema specifies) as a Rust regex, or ``None`` when it uses a
    lookaround or a backreference (no automaton can enforce those token by token)."""
    if not isinstance(pattern, str):
        return None
    pattern = _BRACED_UNICODE.sub(lambda m: f"\\x{{{m.group(1)}}}", pattern)
    pattern = _NAMED_GROUP.sub(r"(?P<\1>", pattern)
    pattern = _CONTROL.sub(lambda m: f"\\x{ord(m.group(1).upper()) - 64:02X}", pattern)
    out: list[str] = []
    pieces = list(scan(pattern))
    for index, (position, piece, in_class) in enumerate(pieces):
        if not in_class and (piece == "^" and index > 0 or piece == "$" and index < len(pieces) - 1
                             or piece in (r"\b", r"\B")):
            return None  # an anchor inside the pattern (or a word boundary) is a lookaround in disguise
        if piece == "(" and not in_class:
            if pattern.startswith(_UNTRANSLATABLE_GROUPS, position):
                return None
        if len(piece) == 2 and piece[0] == "\\":
            letter = piece[1]
            if (letter in "123456789" and not in_class) or letter == "k":
                return None  # backreference
            if piece in _CLASS_ESCAPES:
                body = _CLASS_ESCAPES[piece]
                out.append(body if in_class else f"[{body}]")
                continue
            if piece in _NEGATED and not in_class:
                out.append(_NEGATED[piece])
                continue
            if letter == "/":
                out.append("/")
                continue
        out.append(piece)
    return "".join(out).replace("[^]", r"[\s\S]")
