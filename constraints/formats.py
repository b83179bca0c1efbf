"""String ``format``s: which the grammar enforces (natively or as a pattern) and how the output is checked.

llguidance enforces ``NATIVE_FORMATS`` itself. ``PATTERN_FORMATS`` it lacks become a ``pattern``
(a regex both Rust and Python read alike). ``regex`` and formats nobody defines cannot be
enforced; they are relaxed and the finished output is checked. ``CHECK_FORMATS`` adds the
checks ``jsonschema`` skips when its optional packages are missing, so a date-time that is not
one is never reported valid.

    >>> import re
    >>> bool(re.fullmatch(PATTERN_FORMATS["json-pointer"], "/a/b~1c")), bool(re.fullmatch(CHECK_FORMATS["date-time"], "2024-02-30"))
    (True, False)
"""

from __future__ import annotations

import functools
import re

NATIVE_FORMATS = frozenset({"date-time", "date", "time", "duration", "email", "hostname", "ipv4", "ipv6", "uri", "uuid"})
"""Formats llguidance 1.9 compiles into its lexer."""

_URI_CHARS = r"A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%"
_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*:"
_POINTER = r"(?:/(?:[^~/]|~[01])*)*"

PATTERN_FORMATS: dict[str, str] = {
    "uri-reference": f"[{_URI_CHARS}]*",
    "iri": f"{_SCHEME}[^\\x00-\\x20\"<>\\\\^`{{|}}]*",
    "iri-reference": "[^\\x00-\\x20\"<>\\\\^`{|}]*",
    "uri-template": "[^\\x00-\\x20\"'<>\\\\^`|]*",
    "json-pointer": _POINTER,
    "relative-json-pointer": f"(?:0|[1-9][0-9]*)(?:#|{_POINTER})",
    "idn-email": "[^\\s@\"\\\\]+@[^\\s@\"\\\\.]+(?:\\.[^\\s@\"\\\\.]+)*",
}
"""Formats llguidance does not know, as a regex of the whole (decoded) string."""

_DATE = r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:(?:[0-5][0-9]|60)(?:\.[0-9]+)?"
_OFFSET = r"(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"

CHECK_FORMATS: dict[str, str] = {
    "date-time": f"{_DATE}[Tt ]{_TIME}{_OFFSET}",
    "time": f"{_TIME}{_OFFSET}?",
    "duration": r"P(?:[0-9]+W|(?=[0-9T])(?:[0-9]+Y)?(?:[0-9]+M)?(?:[0-9]+D)?(?:T(?=[0-9])(?:[0-9]+H)?(?:[0-9]+M)?(?:[0-9]+(?:\.[0-9]+)?S)?)?)",
    "hostname": f"{_LABEL}(?:\\.{_LABEL})*\\.?",
    "uri": f"{_SCHEME}[^\\x00-\\x20\"<>\\\\^`{{|}}]*",
    **{name: rx for name, rx in PATTERN_FORMATS.items() if name not in ("idn-email",)},
}
"""Python regexes (full match) checking formats on the finished output."""


CHECKED_FORMATS = frozenset({"regex", "idn-hostname", "idn-email", *CHECK_FORMATS})
"""Formats the output check validates (the rest are annotations, as JSON Schema says of unknown formats)."""


@functools.cache
def format_checker():
    """``jsonschema``'s format checker plus ``CHECK_FORMATS`` (and a real calendar check on dates)."""
    import datetime

    from jsonschema import FormatChecker

    checker = FormatChecker()
    for name, regex in CHECK_FORMATS.items():
        compiled = re.compile(regex)
        checker.checks(name)(lambda value, rx=compiled: not isinstance(value, str) or rx.fullmatch(value) is not None)

    def valid_date_time(value: object) -> bool:
        if not isinstance(value, str):
            return True
        if re.fullmatch(CHECK_FORMATS["date-time"], value) is None:
            return False
        try:
            datetime.date.fromisoformat(value[:10])
        except ValueError:
            return False
        return True

    checker.checks("date-time")(valid_date_time)
    return checker
