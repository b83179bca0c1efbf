"""How constrained JSON is laid out: separators and whitespace between JSON tokens.

A model writes JSON the way it saw it in training, mostly as ``json.dumps`` does:
``{"name": "Raj", "age": 52}``. Forcing another layout (compact ``{"name":"Raj","age":52}``)
puts the model on text it rarely saw, and its next tokens go astray (on SmolLM2-135M the
compact layout turned a bio's age 52 into 25). So the default is ``json.dumps``'s
separators; ``compact``, bounded ``flexible`` whitespace (which lets the model
pretty-print) and the exact ``indent2``/``indent4`` layouts of ``json.dumps(obj, indent=n)``
(``json_indent``) are opt-in.

    >>> JsonLayout.parse("compact")
    JsonLayout(item_separator=',', key_separator=':', whitespace_pattern=None, indent=None)
    >>> JsonLayout.parse(None) == SPACED
    True
    >>> FLEXIBLE.whitespace_pattern
    '[\\\\n\\\\t ]{0,20}'
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sglite.constraints.errors import ConstraintError


@dataclass(frozen=True)
class JsonLayout:
    """Separators of constrained JSON, or a whitespace regex allowed around every JSON token."""

    item_separator: str = ", "
    """Between array items and between object members (``json.dumps``: ``", "``)."""
    key_separator: str = ": "
    """Between a key and its value (``json.dumps``: ``": "``)."""
    whitespace_pattern: str | None = None
    """When set, flexible layout: this regex (keep it bounded) may occur between any two JSON
    tokens, and the separators are bare ``,`` and ``:`` (Outlines' ``whitespace_pattern``)."""
    indent: int | None = None
    """When set, ``json.dumps(obj, indent=indent)``'s layout exactly (llguidance backend; ``json_indent``)."""

    def __post_init__(self) -> None:
        for name, mark in (("item_separator", ","), ("key_separator", ":")):
            value = getattr(self, name)
            if not isinstance(value, str) or value.strip(" \t\n") != mark:
                raise ConstraintError(f"json layout: {name} must be {mark!r} with optional spaces/newlines, got {value!r}")
        if self.indent is not None and (self.indent not in (2, 4) or self.item_separator != ","
                                        or self.key_separator != ": " or self.whitespace_pattern is not None):
            raise ConstraintError("json layout: indent must be 2 or 4, with item_separator ',' and key_separator ': '")
        if self.whitespace_pattern is not None:
            if not isinstance(self.whitespace_pattern, str):
                raise ConstraintError("json layout: whitespace_pattern must be a regex string")
            try:
                re.compile(self.whitespace_pattern)
            except re.error as exc:
                raise ConstraintError(f"json layout: whitespace_pattern is not a valid regex: {exc}") from None

    @classmethod
    def parse(cls, spec: str | JsonLayout | None) -> JsonLayout:
        """``None`` or ``"spaced"`` (default), ``"compact"``, ``"flexible"``, ``"indent2"``, ``"indent4"``, or a ``JsonLayout``."""
        if spec is None:
            return SPACED
        if isinstance(spec, JsonLayout):
            return spec
        try:
            return LAYOUTS[spec]
        except (KeyError, TypeError):
            raise ConstraintError(
                f"json_layout must be one of {', '.join(map(repr, LAYOUTS))}, got {spec!r}"
            ) from None

    @property
    def is_flexible(self) -> bool:
        return self.whitespace_pattern is not None


SPACED = JsonLayout()
"""``{"a": 1, "b": [1, 2]}``: ``json.dumps``'s default separators (the default)."""
COMPACT = JsonLayout(item_separator=",", key_separator=":")
"""``{"a":1,"b":[1,2]}``: fewest tokens."""
FLEXIBLE = JsonLayout(item_separator=",", key_separator=":", whitespace_pattern=r"[\n\t ]{0,20}")
"""Up to 20 spaces, tabs or newlines between any two JSON tokens (enough to pretty-print)."""
INDENT2 = JsonLayout(item_separator=",", key_separator=": ", indent=2)
"""``json.dumps(obj, indent=2)``: one member per line, nested two spaces deeper (llguidance backend)."""
INDENT4 = JsonLayout(item_separator=",", key_separator=": ", indent=4)
"""``json.dumps(obj, indent=4)``."""
LAYOUTS: dict[str, JsonLayout] = {"spaced": SPACED, "compact": COMPACT, "flexible": FLEXIBLE,
                                  "indent2": INDENT2, "indent4": INDENT4}


def apply_layout(regex: str, marker: str, layout: JsonLayout) -> str:
    """Replace ``marker``, the whitespace placeholder a JSON-schema regex was built with, per ``layout``.

    outlines-core writes its whitespace pattern around every JSON token (``\\{M"a"M:M1M,M"b"...``
    for objects, ``,M`` between array items); fixed separators keep one space where
    ``json.dumps`` puts it and drop the rest.

        >>> apply_layout('{M"a"M:M1M,M"b"M:M[M1(,M2)?M]M}', "M", SPACED)
        '{"a": 1, "b": [1(, 2)?]}'
    """
    if layout.is_flexible:
        return regex.replace(marker, f"(?:{layout.whitespace_pattern})")
    item, key = layout.item_separator, layout.key_separator  # only , : space tab newline: literal in a regex
    regex = regex.replace(f"{marker}:{marker}", key)
    regex = regex.replace(f"{marker},{marker}", item).replace(f",{marker}", item)
    return regex.replace(marker, "")
