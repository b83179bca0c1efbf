"""JSON-schema and pydantic constraints: every sampled document parses and validates."""

from __future__ import annotations

import enum
import json
import re
from decimal import Decimal
from typing import Literal, Optional
from uuid import UUID

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from sglite.constraints import ConstraintError, build_logits_processor, normalize_schema, schema_to_regex
from sglite.constraints.numeric_range import integer_range_regex, number_range_regex
from constraint_simulation import simulate_decode

VOCAB = 2048
SHORT = {"type": "string", "maxLength": 8}

SCHEMAS = {
    "flat_object": {
        "type": "object",
        "properties": {"name": SHORT, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
        "required": ["name", "age"],
    },
    "optional_properties": {
        "type": "object",
        "properties": {"id": {"type": "integer"}, "nick": SHORT, "score": {"type": "number"}},
        "required": ["id"],
    },
    "nested_object": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"name": SHORT, "address": {
                    "type": "object",
                    "properties": {"city": SHORT, "zip": {"type": "string", "pattern": "[0-9]{5}"}},
                    "required": ["city", "zip"],
                }},
                "required": ["name", "address"],
            }
        },
        "required": ["user"],
    },
    "int_array_bounded": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
    "string_array": {"type": "array", "items": SHORT, "minItems": 2, "maxItems": 4},
    "enum_array": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 5},
    "top_level_enum": {"enum": ["small", "medium", "large", 42, None, True]},
    "const": {"const": {"version": 2, "kind": "fixed"}},
    "const_property": {
        "type": "object",
        "properties": {"type": {"const": "event"}, "n": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["type", "n"],
    },
    "any_of": {"anyOf": [{"type": "integer"}, SHORT, {"type": "null"}]},
    "one_of_disjoint": {"oneOf": [{"type": "boolean"}, {"type": "array", "items": {"type": "integer"}, "maxItems": 2}]},
    "all_of": {"allOf": [{"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]}]},
    "refs": {
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                            "required": ["x", "y"]}},
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
    },
    "format_date": {"type": "object", "properties": {"d": {"type": "string", "format": "date"}}, "required": ["d"]},
    "format_date_time": {"type": "string", "format": "date-time"},
    "format_time": {"type": "string", "format": "time"},
    "format_ipv4": {"type": "string", "format": "ipv4"},
    "format_uuid": {"type": "array", "items": {"type": "string", "format": "uuid"}, "minItems": 1, "maxItems": 2},
    "integer_bounds": {"type": "integer", "minimum": -50, "maximum": 1200},
    "integer_exclusive": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
    "integer_min_only": {"type": "integer", "minimum": 18},
    "number_bounds": {"type": "number", "minimum": -1.5, "maximum": 2.25},
    "number_exclusive": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "string_pattern": {"type": "string", "pattern": "[A-Z]{3}-[0-9]{2,4}"},
    "string_lengths": {"type": "string", "minLength": 3, "maxLength": 6},
    "bool_and_null": {"type": "object", "properties": {"ok": {"type": "boolean"}, "none": {"type": "null"}},
                      "required": ["ok", "none"]},
    "nullable_type_list": {"type": "object", "properties": {"v": {"type": ["integer", "null"]}}, "required": ["v"]},
    "array_of_objects": {
        "type": "array", "minItems": 1, "maxItems": 3,
        "items": {"type": "object", "properties": {"k": SHORT, "v": {"type": "integer"}}, "required": ["k", "v"]},
    },
    "nested_arrays": {"type": "array", "maxItems": 2, "items": {"type": "array", "items": {"type": "boolean"},
                                                              "maxItems": 3}},
    "closed_object": {"type": "object", "properties": {"a": {"type": "integer"}, "b": SHORT},
                      "additionalProperties": False},
    "tuple_prefix_items": {"type": "array", "prefixItems": [{"type": "integer"}, SHORT, {"type": "boolean"}]},
    "many_required": {
        "type": "object",
        "properties": {k: {"type": "integer", "minimum": 0, "maximum": 99} for k in ("alpha", "beta", "gamma", "delta")},
        "required": ["alpha", "beta", "gamma", "delta"],
    },
    "deep_nesting": {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
            "c": {"type": "array", "items": {"type": "integer", "minimum": 0}, "maxItems": 2}}, "required": ["c"]}},
            "required": ["b"]}},
        "required": ["a"],
    },
    "any_of_objects": {"anyOf": [
        {"type": "object", "properties": {"cat": {"const": "meow"}}, "required": ["cat"]},
        {"type": "object", "properties": {"dog": {"type": "integer"}}, "required": ["dog"]},
    ]},
    "unicode_enum": {"enum": ["café", "naïve", "日本", "😀"]},
    "unicode_string": {"type": "string", "pattern": "[äöüß]{1,4}"},
}


def sample_document(tokenizer, schema, seed: int, temperature: float = 1.0, max_steps: int = 300,
                    backend: str = "outlines", **kwargs) -> str:
    proc = build_logits_processor(tokenizer, VOCAB, backend=backend, json_schema=schema, **kwargs)
    result = simulate_decode(proc, VOCAB, seed=seed, temperature=temperature, max_steps=max_steps,
                             eos_token_ids={tokenizer.eos_token_id})
    text = tokenizer.decode(result.token_ids)
    assert result.finished, f"unfinished after {max_steps} steps: {text!r}"
    return text


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.slow
def test_sampled_documents_validate(tokenizer, name):
    schema = SCHEMAS[name]
    for seed, temperature in ((0, 1.0), (1, 1.0), (2, 0.0)):  # outlines weakens oneOf to anyOf (a warning)
        text = sample_document(tokenizer, schema, seed, temperature)
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize(
    "schema, document",
    [
        ({"type": "string", "format": "email"}, "alice.smith@example.com"),
        ({"type": "string", "format": "uri"}, "https://example.com/a/b?x=1"),
        ({"type": "string"}, "free text with \"quotes\" and \\ escapes"),
        (SCHEMAS["refs"], {"start": {"x": 1, "y": -2}, "end": {"x": 30, "y": 4}}),
        (SCHEMAS["number_bounds"], 2.25),
        (SCHEMAS["number_bounds"], -1.5),
        (SCHEMAS["integer_bounds"], 1200),
    ],
)
def test_valid_documents_are_accepted(tokenizer, schema, document):
    """Unbounded formats wander too long to sample; check the FSM accepts a real instance."""
    proc = build_logits_processor(tokenizer, VOCAB, backend="outlines", json_schema=schema, jump_forward=False)
    for token_id in tokenizer.encode(json.dumps(document), add_special_tokens=False):
        assert token_id in proc.allowed_token_ids()
        proc.accept_token(token_id)
    assert proc.fsm.is_final(proc.state)


@pytest.mark.parametrize("schema, document", [(SCHEMAS["integer_bounds"], 1201), (SCHEMAS["number_bounds"], 2.26),
                                              (SCHEMAS["integer_exclusive"], 10), (SCHEMAS["const"], {"version": 3})])
def test_invalid_documents_are_rejected(schema, document):
    assert not re.fullmatch(schema_to_regex(schema), json.dumps(document, separators=(",", ":")))


# ---- pydantic -------------------------------------------------------------------------------


class Color(str, enum.Enum):
    red = "red"
    blue = "blue"


class Address(BaseModel):
    city: str = Field(max_length=10)
    zip_code: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=130)
    height_m: float = Field(gt=0.3, lt=2.5)
    favourite: Color
    role: Literal["admin", "user"]
    nickname: Optional[str] = Field(default=None, max_length=6)
    addresses: list[Address] = Field(max_length=2)
    id: UUID


class Inventory(BaseModel):
    items: dict[str, int] = Field(max_length=0)
    total: int = Field(ge=0, le=10**6)
    tags: tuple[str, int]


@pytest.mark.parametrize("model", [Person, Address, Inventory])
def test_pydantic_models(tokenizer, model):
    for seed in range(3):
        # Inventory's dict has maxProperties, which only the llguidance backend enforces.
        text = sample_document(tokenizer, model, seed, max_steps=400, backend="llguidance")
        instance = model.model_validate_json(text)
        jsonschema.validate(json.loads(text), model.model_json_schema())
        assert isinstance(instance, model)


def test_schema_inputs_are_equivalent():
    schema = SCHEMAS["flat_object"]
    assert schema_to_regex(schema) == schema_to_regex(json.dumps(schema))
    assert normalize_schema(Address)["properties"]["city"]["maxLength"] == 10


def test_json_layout_follows_json_dumps_by_default(tokenizer):
    doc = {"name": "x", "age": 3, "tags": [1, 2]}
    schema = {"type": "object", "properties": {"name": SHORT, "age": {"type": "integer"},
              "tags": {"type": "array", "items": {"type": "integer"}}}, "required": ["name", "age", "tags"]}
    spaced = schema_to_regex(schema)
    assert re.fullmatch(spaced, json.dumps(doc))
    assert not re.fullmatch(spaced, json.dumps(doc, separators=(",", ":")))
    compact = schema_to_regex(schema, json_layout="compact")
    assert re.fullmatch(compact, json.dumps(doc, separators=(",", ":"))) and not re.fullmatch(compact, json.dumps(doc))
    flexible = schema_to_regex(schema, json_layout="flexible")
    for text in (json.dumps(doc), json.dumps(doc, indent=2), json.dumps(doc, separators=(",", ":"))):
        assert re.fullmatch(flexible, text), text
    assert not re.fullmatch(flexible, json.dumps(doc, indent=21))  # bounded: at most 20 whitespace characters
    no_strings = {"type": "object", "properties": {"ok": {"type": "boolean"}, "tags": {
        "type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 2}}, "required": ["ok", "tags"]}
    for seed in range(3):
        text = sample_document(tokenizer, no_strings, seed)
        assert text == json.dumps(json.loads(text))  # laid out exactly as json.dumps writes it
    with pytest.raises(ConstraintError, match="json_layout must be one of"):
        schema_to_regex(schema, json_layout="pretty-ish")
    text = sample_document(tokenizer, SCHEMAS["flat_object"], 0, whitespace_pattern=r"[ \n]{0,2}")
    jsonschema.validate(json.loads(text), SCHEMAS["flat_object"])


# ---- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schema, fragments",
    [
        ('{"type": "object", "properties": {', ["not valid JSON", "line 1 column 35"]),
        ("[1, 2]", ["JSON object"]),
        ({"type": "strang"}, ["not a valid JSON Schema", "keyword"]),
        ({"type": "object", "properties": {"a": {"minLength": "3"}}}, ["properties/a/minLength"]),
        ({"type": "object", "required": "name"}, ["required"]),
        ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, ["'not'", "/properties/a"]),
        ({"if": {"type": "string"}, "then": {"maxLength": 3}}, ["'if'"]),
        ({"type": "string", "format": "hostname"}, ["hostname"]),
        ({"type": "integer", "minimum": 5, "maximum": 1}, ["empty integer range"]),
        (False, ["false"]),
        (42, ["dict"]),
        (int, ["pydantic"]),
    ],
)
def test_schema_errors_say_what_to_fix(tokenizer, schema, fragments):
    with pytest.raises(ConstraintError) as info:
        build_logits_processor(tokenizer, VOCAB, backend="outlines", json_schema=schema)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


# ---- numeric ranges (outlines-core ignores minimum/maximum) -------------------------------


@settings(max_examples=200, deadline=None)
@given(
    low=st.one_of(st.none(), st.integers(-10**4, 10**4)),
    span=st.one_of(st.none(), st.integers(0, 10**4)),
    probe=st.integers(-2 * 10**4, 2 * 10**4),
)
def test_integer_range_regex(low, span, probe):
    high = None if span is None else (low or 0) + span
    inside = (low is None or probe >= low) and (high is None or probe <= high)
    assert bool(re.fullmatch(integer_range_regex(low, high), str(probe))) == inside


_decimals = st.decimals(min_value=-1000, max_value=1000, places=3, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(low=st.one_of(st.none(), _decimals), high=st.one_of(st.none(), _decimals), probe=_decimals,
       exclusive=st.tuples(st.booleans(), st.booleans()), pad=st.integers(0, 2))
def test_number_range_regex(low, high, probe, exclusive, pad):
    if low is not None and high is not None and (low > high or (low == high and any(exclusive))):
        with pytest.raises(ConstraintError):
            number_range_regex(low, high, exclusive_minimum=exclusive[0], exclusive_maximum=exclusive[1])
        return
    regex = number_range_regex(low, high, exclusive_minimum=exclusive[0], exclusive_maximum=exclusive[1])
    above = low is None or (probe > low if exclusive[0] else probe >= low)
    below = high is None or (probe < high if exclusive[1] else probe <= high)
    text = format(probe, "f") + ("0" * pad if "." in format(probe, "f") else "")
    if text.startswith("-") and Decimal(text) == 0:
        return  # "-0" is never generated
    assert bool(re.fullmatch(regex, text)) == (above and below), (regex, text)
