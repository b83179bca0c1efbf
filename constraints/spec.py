"""What a request asks its output to match: one regex, JSON schema, choice list or grammar, and options.

``ConstraintSpec`` is the backend-neutral description a backend compiles; its ``digest`` keys
the compiled-constraint cache (the text itself is never a key, so a large schema is not
stored twice).

    >>> spec = ConstraintSpec.from_params(choices=["yes", "no"])
    >>> spec.kind, spec.source
    ('choices', '["yes", "no"]')
    >>> spec.digest == ConstraintSpec.from_params(choices=["yes", "no"]).digest
    True
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sglite.constraints.byte_cache import digest
from sglite.constraints.errors import ConstraintError
from sglite.constraints.json_layout import SPACED, JsonLayout

KINDS = ("regex", "json_schema", "choices", "ebnf")


@dataclass(frozen=True)
class ConstraintSpec:
    """One constraint, as text: a regex, a JSON schema (JSON text), choices (a JSON list) or a grammar."""

    kind: str
    """``regex``, ``json_schema``, ``choices`` or ``ebnf`` (a Lark grammar, or GBNF with ``::=`` rules)."""
    source: str
    """The regex, the schema's JSON text (property order kept), the choices as a JSON list, or the grammar."""
    json_layout: JsonLayout = SPACED
    """Whitespace of JSON-schema output (see ``json_layout``)."""
    strict: bool = False
    """JSON schema only: refuse a schema with a keyword the grammar cannot enforce exactly. By default
    such a keyword is relaxed (one ``ConstraintWarning``) and the finished output is validated against
    the full schema (``schema_valid`` in the request's meta info)."""
    digest: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConstraintError(f"constraint kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        layout = self.json_layout
        object.__setattr__(self, "digest", digest(
            self.kind, self.source, layout.item_separator, layout.key_separator,
            layout.whitespace_pattern or "", str(layout.indent), "strict" if self.strict else "checked",
        ))

    @classmethod
    def from_params(
        cls,
        *,
        regex: str | None = None,
        json_schema: Any = None,
        choices: list[str] | tuple[str, ...] | None = None,
        ebnf: str | None = None,
        json_layout: str | JsonLayout | None = None,
        whitespace_pattern: str | None = None,
        strict: bool = False,
    ) -> ConstraintSpec:
        """Exactly one of ``regex``, ``json_schema`` (dict, JSON text or pydantic class), ``choices``, ``ebnf``."""
        given = [name for name, value in (("regex", regex), ("json_schema", json_schema), ("choices", choices),
                                          ("ebnf", ebnf)) if value is not None]
        if len(given) != 1:
            raise ConstraintError(
                f"give exactly one of regex, json_schema, choices, ebnf; got {', '.join(given) if given else 'none'}"
            )
        if json_schema is None:
            for name, value in (("whitespace_pattern", whitespace_pattern), ("json_layout", json_layout)):
                if value is not None:
                    raise ConstraintError(f"{name} only applies to json_schema")
            if strict:
                raise ConstraintError("strict only applies to json_schema")
        layout = JsonLayout.parse(json_layout)
        if whitespace_pattern is not None:
            layout = JsonLayout(item_separator=",", key_separator=":", whitespace_pattern=whitespace_pattern)
        if not isinstance(strict, bool):
            raise ConstraintError(f"strict must be a bool, got {strict!r}")
        if regex is not None:
            if not isinstance(regex, str):
                raise ConstraintError(f"regex must be a string, got {type(regex).__name__}")
            return cls("regex", regex)
        if ebnf is not None:
            if not isinstance(ebnf, str) or not ebnf.strip():
                raise ConstraintError("ebnf must be a non-empty grammar string (Lark, or GBNF with ::= rules)")
            return cls("ebnf", ebnf)
        if choices is not None:
            check_choices(choices)
            return cls("choices", json.dumps(list(choices)))
        return cls("json_schema", schema_text(json_schema), layout, strict)

    @property
    def choices(self) -> list[str]:
        return json.loads(self.source)


def check_choices(choices: Any) -> None:
    """Raise ``ConstraintError`` unless ``choices`` is a non-empty list (or tuple) of strings."""
    if isinstance(choices, str) or not isinstance(choices, (list, tuple)):
        raise ConstraintError(f"choices must be a list of strings, got {type(choices).__name__}")
    if not choices:
        raise ConstraintError("choices is empty: give at least one string")
    bad = [c for c in choices if not isinstance(c, str)]
    if bad:
        raise ConstraintError(f"choices must all be strings; got {bad[0]!r}")


def model_class_schema(schema: type) -> Any:
    """The JSON schema of a pydantic model class; ``ConstraintError`` for any other class."""
    model_json_schema = getattr(schema, "model_json_schema", None)
    if model_json_schema is None:
        raise ConstraintError(
            f"json_schema: class {schema.__name__} is not a pydantic BaseModel; "
            "pass a pydantic model, a dict or a JSON string"
        )
    return model_json_schema()


def schema_text(schema: Any) -> str:
    """The JSON text of a schema given as text, a dict/bool or a pydantic model class (not yet validated)."""
    if isinstance(schema, str):
        return schema
    if isinstance(schema, type):
        return json.dumps(model_class_schema(schema))
    if isinstance(schema, (dict, bool)):
        try:
            return json.dumps(schema, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConstraintError(f"json_schema is not JSON data: {exc}") from None
    raise ConstraintError(
        f"json_schema must be a dict, a JSON string or a pydantic model class; got {type(schema).__name__}"
    )
