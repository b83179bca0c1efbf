"""Both grammar backends behind one API, and llguidance's full JSON Schema: enforced or refused, never dropped.

Outputs come from random logits (``simulate_decode``): whatever the sampler picks, a finished
output validates only because the mask did the work.
"""

from __future__ import annotations

import json
import re
import time
import warnings

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglite.constraints import ConstraintError, ConstraintWarning, backend_processor, make_backend
from constraint_simulation import simulate_decode

VOCAB = 2100  # wider than the tokenizer's 2048, as a model's padded embedding can be
BACKENDS = ["llguidance", "outlines"]


@pytest.fixture(scope="module")
def backends(tokenizer):
    return {name: make_backend(name, tokenizer, VOCAB) for name in BACKENDS}


def run(backend, tokenizer, seed=0, max_steps=300, temperature=1.0, **params):
    proc = backend_processor(backend, **params)
    result = simulate_decode(proc, VOCAB, seed=seed, max_steps=max_steps, temperature=temperature,
                             eos_token_ids={tokenizer.eos_token_id})
    return proc, result, tokenizer.decode(result.token_ids)


def valid_documents(backend, tokenizer, schema, seeds=range(3), max_steps=300, **params):
    """Every finished sample parses and validates; returns how many finished."""
    finished = 0
    for seed in seeds:
        proc, result, text = run(backend, tokenizer, seed, max_steps, json_schema=schema, **params)
        assert getattr(proc, "violation", None) is None
        if result.finished:
            finished += 1
            jsonschema.validate(json.loads(text), schema)
    return finished


# ---- the same features on both backends -----------------------------------------------------

@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("regex", [r"\d{4}-\d{2}-\d{2}", r"(yes|no|maybe)", r"[a-c]{1,3}x?", r"ab(cd)?"])
def test_regex_outputs_match(backends, tokenizer, name, regex):
    for seed in range(3):
        _, result, text = run(backends[name], tokenizer, seed, regex=regex)
        assert result.finished and re.fullmatch(regex, text), text


@pytest.mark.parametrize("name", BACKENDS)
def test_choices_and_json_objects(backends, tokenizer, name):
    for seed in range(4):
        _, _, text = run(backends[name], tokenizer, seed, choices=["red", "green", "a.b"])
        assert text in ("red", "green", "a.b")
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                               "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3}},
              "required": ["name", "age", "tags"]}
    assert valid_documents(backends[name], tokenizer, schema) == 3


@pytest.mark.parametrize("name", BACKENDS)
def test_json_layout_is_json_dumps_by_default(backends, tokenizer, name):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "array", "items": {
        "type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 2}}, "required": ["ok", "n"]}
    for layout, dumps in (("spaced", {}), ("compact", {"separators": (",", ":")})):
        for seed in range(2):
            _, result, text = run(backends[name], tokenizer, seed, json_schema=schema, json_layout=layout)
            assert result.finished and text == json.dumps(json.loads(text), **dumps), text


@pytest.mark.parametrize("name", BACKENDS)
def test_jump_forward_appends_forced_text(backends, tokenizer, name):
    schema = {"type": "object", "properties": {"customer_name": {"type": "string", "maxLength": 5},
                                               "priority": {"enum": ["standard_delivery", "express_delivery"]}},
              "required": ["customer_name", "priority"]}
    on_proc, on, on_text = run(backends[name], tokenizer, 3, json_schema=schema)
    off_proc, off, off_text = run(backends[name], tokenizer, 3, json_schema=schema, jump_forward=False)
    for text in (on_text, off_text):
        jsonschema.validate(json.loads(text), schema)
    assert on_proc.jump_forward_tokens == on.forced >= 8  # keys, quotes, separators, the enum's tail
    assert off_proc.jump_forward_tokens == off.forced == 0
    assert on.steps < off.steps
    _, literal, text = run(backends[name], tokenizer, 0, regex="The quick brown fox jumps over the lazy dog")
    assert text == "The quick brown fox jumps over the lazy dog" and literal.steps == 1


@pytest.mark.parametrize("name", BACKENDS)
def test_backends_share_no_state(tokenizer, name):
    first, second = make_backend(name, tokenizer, VOCAB), make_backend(name, tokenizer, VOCAB)
    backend_processor(first, regex=r"[0-9]{3}")
    assert first.cache_info()["compiled"]["entries"] == 1
    assert second.cache_info()["compiled"]["entries"] == 0
    first.clear_caches()
    assert first.cache_info()["compiled"]["entries"] == 0


# ---- llguidance: the failures of the schema -> regex route, one by one -----------------------

ENFORCED = {
    "multipleOf": {"type": "array", "items": {"type": "integer", "multipleOf": 7}, "minItems": 2, "maxItems": 3},
    "min_max_properties": {"type": "object", "additionalProperties": {"type": "integer"},
                           "minProperties": 2, "maxProperties": 2},
    "required_not_in_properties": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["zz"]},
    "allOf_with_additionalProperties": {
        "allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}],
        "properties": {"a": {}, "b": {"type": "boolean"}}, "additionalProperties": False, "required": ["b"]},
    "format_with_maxLength": {"type": "string", "format": "email", "maxLength": 12},
    "pattern_with_lengths": {"type": "string", "pattern": "^[a-z]+$", "minLength": 2, "maxLength": 4},
    "additionalProperties_empty": {"type": "object", "additionalProperties": {}, "maxProperties": 2},
    "pattern_with_dot": {"type": "object", "properties": {"d": {"type": "string", "pattern": "^a.b$"},
                                                          "e": {"type": "integer"}}, "required": ["d", "e"]},
    "inner_anchor_pattern": {"type": "string", "pattern": "^https?://[a-z]{1,8}$"},
    "unused_defs_with_minimum": {"$defs": {"n": {"minimum": 3}}, "type": "boolean"},
    "subschema_without_type": {"type": "object", "properties": {"a": {"minimum": 1, "maximum": 5}}, "required": ["a"]},
    "false_subschema": {"type": "object", "properties": {"a": {"type": "integer"}, "b": False}, "required": ["a"]},
    "ref_root": {"type": "object", "properties": {"v": {"type": "integer"}, "next": {"$ref": "#"}}, "required": ["v"]},
}


@pytest.mark.parametrize("case", sorted(ENFORCED))
def test_llguidance_enforces_what_the_regex_route_dropped(backends, tokenizer, case):
    assert valid_documents(backends["llguidance"], tokenizer, ENFORCED[case], seeds=range(4), max_steps=200) >= 1


def test_multiple_of_seven_never_gives_nine(backends, tokenizer):
    proc = backend_processor(backends["llguidance"], json_schema={"type": "integer", "multipleOf": 7})
    for token in tokenizer.encode("9", add_special_tokens=False):
        proc.accept_token(token)  # "9" may still become 91 = 7 * 13, but may not end here
    assert not proc.is_accepting() and tokenizer.eos_token_id not in proc.allowed_token_ids()


def test_additional_properties_empty_accepts_a_real_object(backends, tokenizer):
    proc = backend_processor(backends["llguidance"], json_schema={"type": "object", "additionalProperties": {}})
    for token in tokenizer.encode('{"a": 1}', add_special_tokens=False):
        assert token in proc.allowed_token_ids()
        proc.accept_token(token)
    assert proc.is_accepting()


REFUSED = [  # by both backends under strict=True
    ({"type": "array", "uniqueItems": True}, "uniqueItems", "(root)"),
    ({"type": "array", "contains": {"type": "integer"}, "minContains": 2}, "contains", "(root)"),
    ({"type": "object", "propertyNames": {"pattern": "^a"}}, "propertyNames", "(root)"),
    ({"type": "object", "properties": {"a": {"not": {"pattern": "^x"}}}}, "not", "/properties/a"),
    ({"if": {"type": "string"}, "then": {"maxLength": 3}, "else": {"type": "integer"}}, "if", "(root)"),
    ({"$defs": {"x": {"oneOf": [{"type": "integer"}, {"type": "number"}]}}, "$ref": "#/$defs/x"}, "oneOf", "/$defs/x"),
    ({"type": "string", "format": "regex"}, "format", "(root)"),
    ({"type": "string", "pattern": "^(?!abc)"}, "pattern", "(root)"),
]
REFUSED_BY_OUTLINES = [  # llguidance enforces these (schema_rewrite)
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not", "/properties/a"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired", "(root)"),
    ({"type": "object", "dependencies": {"a": ["b"]}}, "dependencies", "(root)"),
    ({"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}}, "dependentSchemas", "(root)"),
]


@pytest.mark.parametrize("name, schema, keyword, pointer",
                         [(name, *case) for name in BACKENDS for case in REFUSED]
                         + [("outlines", *case) for case in REFUSED_BY_OUTLINES])
def test_unenforceable_keywords_are_refused_by_name_and_place(backends, name, schema, keyword, pointer):
    if name == "outlines" and keyword in ("format", "pattern"):
        pytest.skip("outlines-core reports formats and regexes in its own words")
    with pytest.raises(ConstraintError) as info:
        backend_processor(backends[name], json_schema=schema, strict=True)
    message = str(info.value)
    assert repr(keyword) in message and pointer in message, message


@pytest.mark.parametrize("name", BACKENDS)
def test_default_relaxes_with_warnings_naming_each_keyword(backends, tokenizer, name):
    schema = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "integer"},
                                                        "uniqueItems": True, "maxItems": 3}}, "required": ["tags"]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        proc = backend_processor(backends[name], json_schema=schema)
    messages = [str(w.message) for w in caught if issubclass(w.category, ConstraintWarning)]
    assert any("uniqueItems" in m and "/properties/tags" in m for m in messages), messages
    assert proc.warnings and "uniqueItems" in proc.warnings[0]
    assert proc.checker.check('{"tags": [1, 1]}').keyword == "uniqueItems"


def test_one_of_strict_refused_default_approximated(backends, tokenizer):
    schema = {"oneOf": [{"type": "integer"}, {"type": "number"}]}  # overlapping: 1 matches both
    with pytest.raises(ConstraintError, match="oneOf"):
        backend_processor(backends["llguidance"], json_schema=schema, strict=True)
    with pytest.warns(ConstraintWarning, match="oneOf"):
        proc = backend_processor(backends["llguidance"], json_schema=schema)
    assert not proc.checker.check("1").valid and proc.checker.check("1.5").valid


def test_recursive_and_large_schemas_finish_in_bounded_time(backends, tokenizer):
    nested = {"type": "object", "properties": {f"p{i}": {"type": "object", "properties": {
        f"q{j}": {"type": "string", "maxLength": 40} for j in range(20)}} for i in range(40)}}
    for schema in ({"$ref": "#", "type": "array"}, ENFORCED["ref_root"], nested):
        start = time.perf_counter()
        try:
            backend_processor(backends["llguidance"], json_schema=schema)
        except ConstraintError as exc:  # a refusal is fine too, if it names the problem
            assert "circular" in str(exc) or "no base case" in str(exc)
        assert time.perf_counter() - start < 10.0  # milliseconds in practice; generous for loaded CI
    with pytest.raises(ConstraintError, match="'type' at /properties/mode"):  # outlines ignores type next to enum
        backend_processor(backends["outlines"], json_schema={"type": "object", "properties": {
            "mode": {"enum": ["all", "ssl"], "type": "object"}}})
    with pytest.raises(ConstraintError, match="recursive"):  # outlines-core would expand it without bound
        backend_processor(backends["outlines"], json_schema=ENFORCED["ref_root"])


# ---- context-free grammars ------------------------------------------------------------------

TOOL_CALL_LARK = r"""
start: "<tool_call>" call "</tool_call>"
call: "{\"name\": \"" NAME "\", \"arguments\": {" arg ("," " " arg)* "}}"
arg: "\"" KEY "\": " VALUE
NAME: "get_weather" | "get_time"
KEY: /[a-z]{1,6}/
VALUE: /[0-9]{1,3}/ | /"[a-z]{1,8}"/
"""


def test_ebnf_lark_tool_call(backends, tokenizer):
    for seed in range(3):
        _, result, text = run(backends["llguidance"], tokenizer, seed, ebnf=TOOL_CALL_LARK)
        assert result.finished
        body = re.fullmatch(r"<tool_call>(.*)</tool_call>", text, re.S)
        call = json.loads(body.group(1))
        assert call["name"] in ("get_weather", "get_time") and isinstance(call["arguments"], dict)


def test_ebnf_gbnf_and_balanced_parentheses(backends, tokenizer):
    gbnf = 'root ::= "(" inner ")"\ninner ::= "" | "(" inner ")" inner'
    for seed in range(4):
        _, result, text = run(backends["llguidance"], tokenizer, seed, ebnf=gbnf, max_steps=200)
        if result.finished:
            depth = 0
            for char in text:  # a context-free language: no regex could check this
                depth += 1 if char == "(" else -1
                assert depth >= 0
            assert depth == 0 and text.startswith("(")
    with pytest.raises(ConstraintError, match="ebnf"):
        backend_processor(backends["llguidance"], ebnf="start: undefined_rule")
    with pytest.raises(ConstraintError, match="llguidance"):
        backend_processor(backends["outlines"], ebnf=TOOL_CALL_LARK)


# ---- property: small random schemas ---------------------------------------------------------

_leaf = st.one_of(
    st.just({"type": "boolean"}), st.just({"type": "null"}),
    st.builds(lambda lo, span, m: {"type": "integer", "minimum": lo, "maximum": lo + span, "multipleOf": m},
              st.integers(-20, 20), st.integers(10, 40), st.sampled_from([1, 2, 3])),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 5)),
    st.builds(lambda vals: {"enum": vals}, st.lists(st.sampled_from(["a", "b c", 1, None, True]), min_size=1,
                                                   max_size=3, unique=True)),
    st.just({"type": "string", "pattern": "^[a-z]{1,3}$"}),
)


def _containers(inner):
    obj = st.dictionaries(st.sampled_from(["a", "b", "c", "key"]), inner, min_size=1, max_size=3).flatmap(
        lambda props: st.builds(lambda req: {"type": "object", "properties": props, "required": req},
                                st.lists(st.sampled_from(sorted(props)), unique=True)))
    arr = st.builds(lambda items, lo, extra: {"type": "array", "items": items, "minItems": lo, "maxItems": lo + extra},
                    inner, st.integers(0, 2), st.integers(0, 2))
    anyof = st.lists(inner, min_size=2, max_size=2).map(lambda xs: {"anyOf": xs})
    return st.one_of(obj, arr, anyof)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=st.recursive(_leaf, _containers, max_leaves=5), seed=st.integers(0, 10_000))
def test_every_finished_output_validates(backends, tokenizer, schema, seed):
    proc, result, text = run(backends["llguidance"], tokenizer, seed, max_steps=120, json_schema=schema)
    assert proc.violation is None
    if result.finished:
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("name", BACKENDS)
def test_batched_masks_equal_row_by_row_masks(backends, tokenizer, name):
    import torch

    from sglite.runtime.logits_processor import mask_rows

    specs = [{"regex": r"[0-9]{3}"}, {"json_schema": {"type": "array", "items": {"type": "boolean"}}},
             {"choices": ["alpha", "beta"]}, {"regex": r"[a-z ]+"}]
    batch = [backend_processor(backends[name], **spec) for spec in specs]
    single = [backend_processor(backends[name], **spec) for spec in specs]
    for token in tokenizer.encode("[", add_special_tokens=False):
        batch[1].accept_token(token)
        single[1].accept_token(token)
    logits = torch.randn(len(specs), VOCAB, generator=torch.Generator().manual_seed(0))
    expected = logits.clone()
    mask_rows(logits, list(enumerate(batch)))
    for row, proc in enumerate(single):
        proc.mask_logits(expected[row])
    assert torch.equal(logits, expected)
    assert all(0 < torch.isinf(logits[row]).sum() < VOCAB for row in range(len(specs)))  # each row really masked


@pytest.mark.parametrize("name", BACKENDS)
def test_sentencepiece_tokenizer(sp_tokenizer, name):
    backend = make_backend(name, sp_tokenizer, VOCAB)
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "São Paulo"]}, "n": {"type": "integer",
              "minimum": 1, "maximum": 99}}, "required": ["city", "n"]}
    for seed in range(3):
        proc, result, text = run(backend, sp_tokenizer, seed, json_schema=schema)
        assert result.finished and proc.violation is None
        jsonschema.validate(json.loads(text), schema)
