"""JSON Schema keywords enforced by rewriting (schema_rewrite), the rest checked on the output (schema_valid).

Enforcement is shown on the llguidance matcher itself: a document violating the keyword is
rejected token by token, one satisfying it accepted, and ``strict=True`` compiles (nothing was
relaxed). The check is shown through the engine, the HTTP server and the DSL: every finished
output's ``schema_valid`` equals an independent ``jsonschema`` validation.
"""

from __future__ import annotations

import json
import warnings

import jsonschema
import pytest

import sglite
from sglite.constraints import ConstraintError, ConstraintWarning, backend_processor, make_backend
from sglite.constraints.formats import format_checker

VOCAB = 2048


@pytest.fixture(scope="module")
def backend(tokenizer):
    return make_backend("llguidance", tokenizer, VOCAB, {tokenizer.eos_token_id})


def accepts(backend, tokenizer, schema, text: str) -> bool:
    """Whether the strict grammar of ``schema`` lets the model write ``text`` and then stop."""
    proc = backend_processor(backend, json_schema=schema, strict=True, jump_forward=False)
    for token_id in tokenizer.encode(text, add_special_tokens=False):
        proc.accept_token(token_id)
        if proc.violation is not None:
            return False
    return proc.is_accepting()


ENFORCED = {  # schema, a valid document, an invalid one (each invalid only through the keyword)
    "format json-pointer": ({"type": "string", "format": "json-pointer"}, '"/a/b~1c"', '"a/b"'),
    "format uri-reference": ({"type": "string", "format": "uri-reference"}, '"../x?y=1"', '"a b"'),
    "format relative-json-pointer": ({"type": "string", "format": "relative-json-pointer"}, '"1/a"', '"/a"'),
    "pattern \\d is ASCII": ({"type": "string", "pattern": "^\\d+$"}, '"42"', '"4\u0664"'),
    "pattern \\w is ASCII": ({"type": "string", "pattern": "^\\w+$"}, '"ab_1"', '"ab\u00e9"'),
    "pattern \\/ escape": ({"type": "string", "pattern": "^a\\/b$"}, '"a/b"', '"a\\\\/b"'),
    "patternProperties ECMA": ({"type": "object", "patternProperties": {"^x\\d$": {"type": "integer"}},
                                "additionalProperties": False}, '{"x1": 2}', '{"xa": 2}'),
    "oneOf disjoint types": ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "3", "true"),
    "oneOf const discriminator": (
        {"type": "object", "oneOf": [
            {"properties": {"kind": {"const": "a"}, "x": {"type": "integer"}}, "required": ["kind", "x"]},
            {"properties": {"kind": {"const": "b"}, "y": {"type": "string"}}, "required": ["kind", "y"]}]},
        '{"kind": "a", "x": 1}', '{"kind": "a", "y": "s"}'),
    "oneOf disjoint required keys": (
        {"oneOf": [
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False},
            {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"], "additionalProperties": False}]},
        '{"b": 1}', '{"c": 1}'),
    "dependentRequired": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                           "dependentRequired": {"a": ["b"]}}, '{"a": 1, "b": 2}', '{"a": 1}'),
    "dependencies (array)": ({"$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                              "dependencies": {"a": ["b"]}}, '{"b": 2}', '{"a": 1}'),
    "dependentSchemas": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                          "dependentSchemas": {"a": {"required": ["b"]}}}, '{"a": 1, "b": 2}', '{"a": 1}'),
    "not type": ({"type": ["string", "integer"], "not": {"type": "string"}}, "7", '"s"'),
    "not required": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                      "not": {"required": ["b"]}}, '{"a": 1}', '{"a": 1, "b": 2}'),
    "not required admits objects only": ({"type": ["object", "string"], "properties": {"a": {"type": "integer"}},
                                          "not": {"required": ["a"]}}, "{}", '"s"'),
    "not {}": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"not": {}}}},
               '{"a": 1}', '{"b": 1}'),
    "remote meta-schema ref": ({"$ref": "http://json-schema.org/draft-04/schema#/definitions/positiveInteger"},
                               "5", "-5"),
    "recursive root with siblings": ({"type": "object", "properties": {"next": {"$ref": "#"}, "v": {"type": "integer"}},
                                      "required": ["v"]}, '{"next": {"v": 2}, "v": 1}', '{"next": {}, "v": 1}'),
}


@pytest.mark.parametrize("name", sorted(ENFORCED))
def test_keyword_is_enforced_by_the_grammar(backend, tokenizer, name):
    schema, valid, invalid = ENFORCED[name]
    validator = jsonschema.validators.validator_for(schema)(schema, format_checker=format_checker())
    assert validator.is_valid(json.loads(valid))
    if "ASCII" not in name:  # Python's re (jsonschema's) reads \d and \w as Unicode; ECMA-262 as ASCII
        assert not validator.is_valid(json.loads(invalid))
    assert accepts(backend, tokenizer, schema, valid), valid
    assert not accepts(backend, tokenizer, schema, invalid), invalid


RELAXED = [  # keyword, schema: refused with strict=True, compiled with one warning by default
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}),
    ("oneOf", {"oneOf": [{"type": "integer"}, {"type": "number"}]}),
    ("pattern", {"type": "string", "pattern": "^(?!admin)[a-z]+$"}),
    ("not", {"type": "string", "not": {"enum": ["admin"]}}),
    ("format", {"type": "string", "format": "regex"}),
    ("maximum", {"type": "number", "maximum": 1.7976931348623157e308}),
]


@pytest.mark.parametrize("keyword, schema", RELAXED)
def test_unenforceable_keyword_relaxed_with_one_warning_and_checked(backend, keyword, schema):
    with pytest.raises(ConstraintError, match=repr(keyword)):
        backend_processor(backend, json_schema=schema, strict=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        proc = backend_processor(backend, json_schema=schema)
    relaxations = [str(w.message) for w in caught if issubclass(w.category, ConstraintWarning)]
    assert len(relaxations) == 1 and repr(keyword) in relaxations[0], relaxations
    assert proc.checker is not None


@pytest.mark.parametrize("schema, document, keyword, pointer", [
    ({"type": "array", "uniqueItems": True}, "[1, 1]", "uniqueItems", "/uniqueItems"),
    ({"properties": {"d": {"type": "string", "format": "date-time"}}}, '{"d": "2024-13-01T00:00:00Z"}',
     "format", "/properties/d/format"),
    ({"properties": {"d": {"type": "string", "format": "date-time"}}}, '{"d": "2023-02-29T00:00:00Z"}',
     "format", "/properties/d/format"),
    ({"type": "string", "pattern": "^(?!admin)"}, '"admin"', "pattern", "/pattern"),
])
def test_checker_names_the_failing_keyword_and_pointer(backend, schema, document, keyword, pointer):
    proc = backend_processor(backend, json_schema=schema)
    verdict = proc.checker.check(document)
    assert (verdict.valid, verdict.keyword, verdict.pointer) == (False, keyword, pointer)
    assert proc.checker.check("[1, ").valid is False  # truncated output is never valid


@pytest.mark.parametrize("schema, needle", [
    ({"properties": {"a": {"$ref": "#/definitions/missing"}}}, "'$ref' at /properties/a"),
    ({"$ref": "https://example.com/other.json"}, "'$ref' at (root)"),
    ({"properties": {"a": {"type": "string", "pattern": "(ab"}}}, "'pattern' at /properties/a"),
    ({"patternProperties": {"[a-": {}}}, "'patternProperties' at /patternProperties/[a-"),
    ({"type": "object", "properties": {"self": {"$ref": "#"}}, "required": ["self"]}, "no base case"),
    ({"$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}, "minItems": 1}}, "$ref": "#/$defs/n"},
     "no base case"),
    ({"type": "string", "minLength": -1}, "'minLength' at /minLength"),
])
def test_bad_schema_is_refused_naming_keyword_and_pointer(backend, schema, needle):
    for strict in (False, True):
        with pytest.raises(ConstraintError) as info:
            backend_processor(backend, json_schema=schema, strict=strict)
        assert needle in str(info.value), str(info.value)


def test_shared_sample_runs_by_default(tokenizer):
    """Every schema of a cross-section of the JSONSchemaBench sample compiles by default (the benchmark runs all)."""
    from pathlib import Path

    sample = Path(__file__).resolve().parents[2] / "shared/jsonschemabench/dev_sample.jsonl"
    if not sample.exists():
        sample = Path("/work/shared/jsonschemabench/dev_sample.jsonl")
    if not sample.exists():
        pytest.skip("the shared JSONSchemaBench sample is not on this machine")
    rows = [json.loads(line) for line in sample.open()][::7]
    backend = make_backend("llguidance", tokenizer, VOCAB, {tokenizer.eos_token_id})
    refused = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstraintWarning)
        for row in rows:
            try:
                backend_processor(backend, json_schema=row["schema"])
            except ConstraintError as exc:
                refused.append((row["file"], str(exc)[:120]))
    assert not refused, refused


# ---- through the engine, the server and the DSL ------------------------------------------------

UNIQUE_TAGS = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "integer"},
                                                         "uniqueItems": True, "minItems": 2, "maxItems": 4}},
               "required": ["tags"]}


def independent_verdict(schema, text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


@pytest.fixture(scope="module")
def engine(llama_path):
    with sglite.Engine(str(llama_path), device="cpu", max_total_tokens=8192) as engine:
        yield engine


def test_engine_reports_schema_valid_equal_to_jsonschema(engine):
    params = [{"json_schema": UNIQUE_TAGS, "temperature": 1.0, "seed": seed, "max_new_tokens": 48} for seed in range(12)]
    params.append({"json_schema": UNIQUE_TAGS, "max_new_tokens": 3})  # truncated: never valid
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstraintWarning)
        outs = engine.generate(["Tags:"] * len(params), params)
    verdicts = [out["meta_info"]["schema_valid"] for out in outs]
    assert verdicts == [independent_verdict(UNIQUE_TAGS, out["text"]) for out in outs]
    assert verdicts[-1] is False and "not complete JSON" in outs[-1]["meta_info"]["schema_error"]
    for out in outs:
        assert out["meta_info"]["schema_valid"] or out["meta_info"]["schema_error"]
    free = engine.generate("Tags:", {"max_new_tokens": 4})
    assert "schema_valid" not in free["meta_info"]


def test_server_and_dsl_report_schema_valid(engine, runtime):
    import httpx
    import openai

    from sglite.runtime.server.testing import serve_in_thread

    with serve_in_thread(engine) as url:
        native = httpx.post(f"{url}/generate", json={"text": "Tags:", "sampling_params": {
            "json_schema": UNIQUE_TAGS, "max_new_tokens": 3}}, timeout=60).json()
        assert native["meta_info"]["schema_valid"] is False and native["meta_info"]["schema_error"]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        fmt = {"type": "json_schema", "json_schema": {"name": "tags", "schema": UNIQUE_TAGS}}
        out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "tags"}],
                                             response_format=fmt, max_tokens=48, temperature=1.0, seed=4)
        choice = out.choices[0].model_dump()
        assert choice["schema_valid"] is independent_verdict(UNIQUE_TAGS, choice["message"]["content"])
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "tags"}],
                                                response_format=fmt, max_tokens=2, stream=True)
        last = [chunk.choices[0].model_dump() for chunk in stream if chunk.choices][-1]
        assert last["finish_reason"] == "length" and last["schema_valid"] is False

    @sglite.function
    def tags(s):
        s += "Tags: " + sglite.gen("tags", json_schema=UNIQUE_TAGS, max_tokens=3)

    state = tags.run(backend=runtime)
    assert state.get_meta_info("tags")["schema_valid"] is False
