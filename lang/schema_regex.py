"""``build_regex_from_object``: a pydantic model or JSON schema as a regex for ``gen(regex=...)``.

SGLang's ``json_decode.py`` builds its regex this way (from ``sglang.srt.constrained.outlines_backend``);
the same call works here, from ``sglite`` or from ``sglite.srt.constrained.outlines_backend``.

    >>> import re
    >>> regex = build_regex_from_object({"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]})
    >>> bool(re.fullmatch(regex, '{"age": 42}')), bool(re.fullmatch(regex, '{"age":42}')), bool(re.fullmatch(regex, '{"age": "x"}'))
    (True, True, False)
"""

from __future__ import annotations

import json
from typing import Any

from sglite.constraints.json_schema import schema_to_regex

OUTLINES_WHITESPACE = r"[ ]?"
"""The whitespace Outlines (and so SGLang) allows between JSON tokens by default: one optional space."""


def build_regex_from_object(object: Any, whitespace_pattern: str | None = None) -> str:  # noqa: A002 - SGLang's name
    """The regex of the JSON documents valid under ``object``: a pydantic model class, a JSON schema
    dict, or a JSON schema string (SGLang's signature). ``whitespace_pattern`` is the regex allowed
    between JSON tokens (default ``[ ]?``, as in Outlines). A schema keyword the regex cannot enforce
    raises ``ConstraintError`` naming it (Outlines would drop it silently).

        >>> from pydantic import BaseModel
        >>> class Wizard(BaseModel):
        ...     name: str
        ...     age: int
        >>> import re; bool(re.fullmatch(build_regex_from_object(Wizard), '{"name": "Merlin", "age": 900}'))
        True
    """
    if isinstance(object, type) and hasattr(object, "model_json_schema"):
        schema = object.model_json_schema()
    elif isinstance(object, dict):
        schema = object
    elif isinstance(object, str):
        schema = json.loads(object)
    else:
        raise TypeError(f"build_regex_from_object takes a pydantic model class, a dict or a JSON string, got {type(object).__name__}")
    return schema_to_regex(schema, whitespace_pattern=OUTLINES_WHITESPACE if whitespace_pattern is None else whitespace_pattern)
