"""The finished output of a JSON-schema request, validated against the full schema.

The grammar enforces what it can token by token; what it relaxed (``schema_rewrite``) and
anything a truncated output left undone is caught here. Every JSON-schema request gets a
verdict (``schema_valid`` in its meta info) from ``jsonschema`` with format checking
(``formats.format_checker``), so an output is never reported valid when it is not.

    >>> checker = SchemaChecker({"type": "array", "uniqueItems": True})
    >>> checker.check("[1, 2]").valid
    True
    >>> result = checker.check("[1, 1]")
    >>> result.valid, result.keyword, result.pointer
    (False, 'uniqueItems', '/uniqueItems')
    >>> checker.check('[1, ').error
    'the output is not complete JSON: Expecting value at char 4'
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sglite.constraints.formats import format_checker
from sglite.constraints.schema_keywords import escape_pointer

MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class SchemaCheck:
    """One output's verdict: valid, or the failing keyword and its JSON pointer in the schema."""

    valid: bool
    error: str | None = None
    keyword: str | None = None
    pointer: str | None = None
    """JSON pointer of the failing keyword in the schema (``/properties/tags/uniqueItems``)."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class SchemaChecker:
    """Validates output texts against one schema (the validator is built once, per compiled constraint)."""

    def __init__(self, schema: Any) -> None:
        from jsonschema import Draft202012Validator
        from jsonschema.validators import validator_for

        cls = validator_for(schema, default=Draft202012Validator)
        self.validator = cls(schema, format_checker=format_checker())

    def check(self, text: str) -> SchemaCheck:
        """The verdict on ``text``: it must be one JSON document valid under the schema."""
        from jsonschema.exceptions import best_match

        try:
            document = json.loads(text, parse_constant=_reject_constant)
        except json.JSONDecodeError as exc:
            return SchemaCheck(False, f"the output is not complete JSON: {exc.msg} at char {exc.pos}")
        except (ValueError, RecursionError) as exc:
            return SchemaCheck(False, f"the output is not JSON: {exc}"[:MAX_ERROR_CHARS])
        try:
            error = best_match(self.validator.iter_errors(document))
        except RecursionError:
            return SchemaCheck(False, "the output nests too deeply to validate")
        if error is None:
            return SchemaCheck(True)
        pointer = "/" + "/".join(escape_pointer(str(p)) for p in error.absolute_schema_path)
        keyword = str(error.validator)
        return SchemaCheck(False, f"{keyword!r} at {pointer}: {error.message}"[:MAX_ERROR_CHARS], keyword, pointer)
