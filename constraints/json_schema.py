"""JSON schema in, regex out: normalise the input, check it, and hand it to outlines-core.

A schema may arrive as a ``dict``, a JSON string or a pydantic ``BaseModel`` subclass. It is
parsed (errors name the JSON position), checked against the Draft 2020-12 meta-schema
(errors name the keyword and its path), then compiled to a regex by outlines-core. Numeric
``minimum``/``maximum`` bounds, which outlines-core ignores, are compiled here
(``numeric_range``) and spliced into its regex, as are the string formats in
``FORMAT_REGEXES`` (``ipv4``, and JSON-safe ``time``/``email``/``uri``).

The layout follows ``json.dumps`` by default (``{"a": 1, "b": [2, 3]}``, the text models saw in
training); ``json_layout`` picks ``compact`` or bounded ``flexible`` whitespace instead, and
``whitespace_pattern`` any regex between JSON tokens (``json_layout``).

    >>> import json, re
    >>> rx = schema_to_regex({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}},
    ...                       "required": ["n"]})
    >>> bool(re.fullmatch(rx, '{"n": 42}')), bool(re.fullmatch(rx, '{"n": 0}'))
    (True, False)
"""

from __future__ import annotations

import functools
import json
import math
import secrets
from decimal import Decimal
from typing import Any, Union

from outlines_core.json_schema import build_regex_from_schema

from sglite.constraints.byte_cache import ByteLRU, digest
from sglite.constraints.errors import ConstraintError
from sglite.constraints.json_layout import JsonLayout, apply_layout
from sglite.constraints.numeric_range import integer_range_regex, number_range_regex
from sglite.constraints.schema_keywords import subschemas
from sglite.constraints.spec import model_class_schema
from sglite.constraints.regex_budget import MAX_REGEX_SIZE, budget_problem

SchemaInput = Union[str, dict, bool, type]
"""What ``json_schema=`` accepts: a JSON string, a dict, or a pydantic model class."""

_BOUND_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")

_URI_CHAR = r'[^\s"\\\x00-\x1f\x7f{exclude}]'  # needs no JSON escape
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
FORMAT_REGEXES: dict[str, str] = {
    # outlines-core's own "time" has a stray "\\." (invalid JSON escape) and no offsets.
    "time": r"(?:2[0-3]|[01][0-9]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?(?:Z|[+-](?:2[0-3]|[01][0-9]):[0-5][0-9])?",
    # Dot-atom addresses only: outlines-core's quoted local part would put raw quotes in the JSON.
    "email": r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+[a-z0-9](?:[a-z0-9-]*[a-z0-9])?",
    "uri": r"(?:https?|ftp)://(?:[a-zA-Z0-9.-]+\.[a-zA-Z]{2,}|localhost)(?::[0-9]{1,5})?"
    + f"(?:/{_URI_CHAR.format(exclude='?#')}*)?(?:\\?{_URI_CHAR.format(exclude='#')}*)?(?:#{_URI_CHAR.format(exclude='')}*)?",
    "ipv4": rf"{_OCTET}(?:\.{_OCTET}){{3}}",
}
"""String formats compiled here instead of by outlines-core (the regex between the quotes)."""

# Keywords whose values are one subschema, a list of them, or a name -> subschema map.
_ONE_SCHEMA = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames")
_SCHEMA_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAP = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")

# Keywords outlines-core rejects; named in errors so the user knows what to drop.
_UNSUPPORTED = ("not", "if", "then", "else", "dependentSchemas", "contains", "propertyNames",
                "unevaluatedProperties", "unevaluatedItems")


def normalize_schema(schema: SchemaInput) -> dict | bool:
    """Parse and validate ``schema`` into a JSON-schema ``dict`` (or ``bool``).

    Raises ``ConstraintError`` for malformed JSON (with line/column), for a type that is not a
    schema, and for anything the Draft 2020-12 meta-schema rejects (with keyword and path).
    """
    if isinstance(schema, type):
        parsed: Any = model_class_schema(schema)
    elif isinstance(schema, str):
        try:
            parsed = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise ConstraintError(
                f"json_schema is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno} (char {exc.pos})"
            ) from None
        except ValueError as exc:  # e.g. an integer literal over Python's 4300-digit limit
            raise ConstraintError(f"json_schema cannot be parsed: {exc}") from None
    elif isinstance(schema, (dict, bool)):
        parsed = schema
    else:
        raise ConstraintError(
            f"json_schema must be a dict, a JSON string or a pydantic model class; got {type(schema).__name__}"
        )
    if not isinstance(parsed, (dict, bool)):
        raise ConstraintError(f"json_schema must be a JSON object, got a JSON {type(parsed).__name__}")
    _check_meta_schema(parsed)
    return parsed


@functools.cache
def _fast_meta_validator():
    """Draft-7's meta-schema compiled to Python (fastjsonschema): far faster than interpreting
    2020-12's, and it never holds the GIL for long. A constant, built once."""
    import fastjsonschema
    from jsonschema import Draft7Validator

    return fastjsonschema.compile(Draft7Validator.META_SCHEMA, use_default=False)  # never write into the schema


def _check_meta_schema(schema: dict | bool) -> None:
    import fastjsonschema
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    try:
        _fast_meta_validator()(schema)
        return
    except fastjsonschema.JsonSchemaException:
        pass  # rare: find the precise keyword and path with the full 2020-12 meta-schema
    error = best_match(Draft202012Validator(Draft202012Validator.META_SCHEMA).iter_errors(schema))
    if error is None:
        return  # valid under 2020-12 though not under draft 7
    if error is not None:
        path = [str(p) for p in error.absolute_path]
        keyword = path[-1] if path else error.validator
        raise ConstraintError(
            f"json_schema is not a valid JSON Schema (Draft 2020-12): keyword {keyword!r} at "
            f"/{'/'.join(path)}: {error.message}"
        )


def schema_to_regex(
    schema: SchemaInput,
    whitespace_pattern: str | None = None,
    json_layout: str | JsonLayout | None = None,
    *,
    cache: ByteLRU[str] | None = None,
    max_regex_size: int = MAX_REGEX_SIZE,
) -> str:
    """The regex of every JSON document valid under ``schema`` (as far as outlines-core supports).

    ``json_layout`` (``"spaced"``, the default, ``"compact"``, ``"flexible"``) sets the separators;
    ``whitespace_pattern``, if given, is the regex allowed between any two JSON tokens instead.
    ``cache`` (owned by the caller's backend) memoizes translations by digest. Raises
    ``ConstraintError`` naming the problem for bad or unsupported schemas.

        >>> schema_to_regex({"enum": ["red", "green"]})
        '("red"|"green")'
        >>> import re
        >>> rx = schema_to_regex({"type": "array", "items": {"type": "boolean"}}, json_layout="compact")
        >>> bool(re.fullmatch(rx, "[true,false]")), bool(re.fullmatch(rx, "[true, false]"))
        (True, False)
    """
    layout = JsonLayout.parse(json_layout)
    if whitespace_pattern is not None:
        layout = JsonLayout(item_separator=",", key_separator=":", whitespace_pattern=whitespace_pattern)
    key = _cache_key(schema, layout, max_regex_size)
    cached = cache.get(key) if cache is not None and key is not None else None
    if cached is not None:
        return cached
    regex = _compile_schema(schema, layout, max_regex_size)
    if cache is not None and key is not None:
        cache.put(key, regex, 2 * len(regex) + 64)
    return regex


def _cache_key(schema: SchemaInput, layout: JsonLayout, max_regex_size: int) -> str | None:
    """A digest of the schema text and options; property order shapes the regex, so it is kept."""
    if isinstance(schema, type):
        text = f"{schema.__module__}.{schema.__qualname__}:{id(schema)}"
    elif isinstance(schema, str):
        text = schema
    else:
        try:
            text = json.dumps(schema)
        except (TypeError, ValueError):
            return None  # not JSON data: let normalize_schema report it
    return digest(type(schema).__name__, text, repr(layout), str(max_regex_size))


def _compile_schema(schema: SchemaInput, layout: JsonLayout, max_regex_size: int) -> str:
    parsed = normalize_schema(schema)
    if parsed is True:
        parsed = {}
    elif parsed is False:
        raise ConstraintError("json_schema is `false`: no document is valid, so nothing can be generated")
    nonce = secrets.token_hex(4)
    rewritten, overrides = _extract_overrides(parsed, nonce)
    marker = f"sglitews{nonce}"  # where outlines-core puts whitespace; json_layout decides what goes there
    try:
        regex = build_regex_from_schema(json.dumps(rewritten), marker)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ConstraintError(_unsupported_message(parsed, str(exc))) from None
    regex = apply_layout(regex, marker, layout)
    for placeholder, override in overrides.items():
        quoted = f'"{placeholder}"'
        if quoted not in regex:
            raise ConstraintError(f"internal: schema placeholder {placeholder} vanished from the regex")
        regex = regex.replace(quoted, f"(?:{override})")
    problem = budget_problem(regex, max_regex_size)
    if problem is not None:
        raise ConstraintError(f"json_schema is too large for a constraint FSM{_largest_bound(parsed)}: {problem}")
    return regex


_COUNT_KEYWORDS = ("maxLength", "minLength", "maxItems", "minItems")


def _largest_bound(schema: Any) -> str:
    """Where to start shrinking: ``" (largest count: maxLength=5000 at /properties/bio)"``, or the
    numeric bound with the most digits, or ``""``."""
    counts, bounds = [], []
    for path, node in subschemas(schema):
        counts.extend((node[k], k, path) for k in _COUNT_KEYWORDS if isinstance(node.get(k), int))
        bounds.extend((_digits(Decimal(str(node[k]))), k, path) for k in _BOUND_KEYS
                      if isinstance(node.get(k), (int, float)))
    if counts:
        value, keyword, path = max(counts, key=lambda c: c[0])
        return f" (largest count: {keyword}={value} at {path or '(root)'})"
    if bounds:
        digits, keyword, path = max(bounds, key=lambda b: b[0])
        return f" (longest bound: {keyword} at {path or '(root)'}, {digits} digits)"
    return ""


def _extract_overrides(schema: Any, nonce: str) -> tuple[Any, dict[str, str]]:
    """Swap each subschema compiled here (bounded numbers, ``FORMAT_REGEXES``) for a unique ``const``.

    outlines-core renders the ``const`` as the literal ``"placeholder"`` and the caller splices
    in the exact regex; walking only subschema positions keeps ``enum``/``const`` data intact.
    """
    overrides: dict[str, str] = {}

    def placeholder(regex: str) -> dict:
        name = f"sglite{len(overrides)}x{nonce}"
        overrides[name] = regex
        return {"const": name}

    def walk(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        if "enum" not in node and "const" not in node:
            if node.get("type") in ("integer", "number") and any(k in node for k in _BOUND_KEYS):
                return placeholder(_bounded_number_regex(node))
            plain_string = not any(k in node for k in ("pattern", "minLength", "maxLength"))
            if node.get("type") == "string" and plain_string and node.get("format") in FORMAT_REGEXES:
                return placeholder(f'"{FORMAT_REGEXES[node["format"]]}"')
        out = dict(node)
        for key in _ONE_SCHEMA:
            if isinstance(out.get(key), dict):
                out[key] = walk(out[key])
        for key in _SCHEMA_LIST:
            if isinstance(out.get(key), list):
                out[key] = [walk(s) for s in out[key]]
        for key in _SCHEMA_MAP:
            if isinstance(out.get(key), dict):
                out[key] = {name: walk(s) for name, s in out[key].items()}
        return out

    return walk(schema), overrides


def _bounded_number_regex(node: dict) -> str:
    low, low_exclusive = _tightest(node, "minimum", "exclusiveMinimum", lower=True)
    high, high_exclusive = _tightest(node, "maximum", "exclusiveMaximum", lower=False)
    if node["type"] == "integer":
        # Integers: an exclusive or fractional bound tightens to the next whole number inside.
        low_int = None if low is None else (math.floor(low) + 1 if low_exclusive else math.ceil(low))
        high_int = None if high is None else (math.ceil(high) - 1 if high_exclusive else math.floor(high))
        try:
            return integer_range_regex(low_int, high_int)
        except ConstraintError as exc:
            raise ConstraintError(f"json_schema: {exc}") from None
    try:
        return number_range_regex(low, high, exclusive_minimum=low_exclusive, exclusive_maximum=high_exclusive)
    except ConstraintError as exc:
        raise ConstraintError(f"json_schema: {exc}") from None


MAX_BOUND_DIGITS = 400
"""Most digits a numeric bound may have (``1.8e308``, the largest double, has 309): the
regex grows with the square of the digits, and the regex budget refuses far fewer."""


def _tightest(node: dict, inclusive_key: str, exclusive_key: str, *, lower: bool) -> tuple[Decimal | None, bool]:
    """The binding bound among ``minimum``/``exclusiveMinimum`` (or the maximum pair)."""
    candidates = []
    for key, exclusive in ((inclusive_key, False), (exclusive_key, True)):
        if key in node:
            candidates.append((_bound(node[key], key), exclusive))
    if not candidates:
        return None, False
    # For a lower bound the larger value binds; on a tie the exclusive one is stricter.
    if lower:
        return max(candidates, key=lambda c: (c[0], c[1]))
    return min(candidates, key=lambda c: (c[0], not c[1]))


def _bound(value: Any, keyword: str) -> Decimal:
    try:
        bound = Decimal(str(value))
    except ValueError:  # str() of an int over Python's 4300-digit limit
        bound = None
    if bound is None or not bound.is_finite() or _digits(bound) > MAX_BOUND_DIGITS:
        raise ConstraintError(
            f"json_schema: {keyword} has more than {MAX_BOUND_DIGITS} digits; use a smaller bound or none"
        )
    return bound


def _digits(value: Decimal) -> int:
    """Digits of ``value`` written in fixed point (integer part plus fraction)."""
    exponent = value.as_tuple().exponent
    fraction = -exponent if isinstance(exponent, int) and exponent < 0 else 0
    return max(value.adjusted() + 1, 1) + fraction


def _unsupported_message(schema: Any, detail: str) -> str:
    found = _find_keyword(schema, _UNSUPPORTED, "")
    detail = detail.split("\n")[0].strip()
    if found is not None:
        keyword, path = found
        return (
            f"json_schema uses {keyword!r} at {path or '(root)'}, which the constraint compiler "
            f"(outlines-core) does not support; remove it or express it with anyOf/enum ({detail})"
        )
    return f"json_schema is not supported by the constraint compiler (outlines-core): {detail}"


def _find_keyword(node: Any, keywords: tuple[str, ...], path: str) -> tuple[str, str] | None:
    for sub_path, sub in subschemas(node, path):
        for keyword in keywords:
            if keyword in sub:
                return keyword, sub_path
    return None

