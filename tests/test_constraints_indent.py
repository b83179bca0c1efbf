"""``json_layout="indent2"``/``"indent4"``: the output is exactly ``json.dumps(obj, indent=n)``'s text.

On the tiny random model and on random logits the mask does all the work: whatever the model
prefers, parsing the output and dumping it again with the same indent gives the output back.
"""

from __future__ import annotations

import json

import pytest

import sglite
from sglite.constraints import ConstraintError, backend_processor, make_backend
from sglite.constraints.json_indent import LayoutState
from constraint_simulation import simulate_decode

VOCAB = 2048
WORD = {"type": "string", "pattern": "^[a-z]{1,6}$"}
SCHEMA = {
    "type": "object",
    "properties": {
        "name": WORD,
        "tags": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 3},
        "inner": {"type": "object", "properties": {
            "ok": {"type": "boolean"},
            "rows": {"type": "array", "items": {"type": "array", "items": WORD, "maxItems": 2}, "maxItems": 2},
            "empty": {"type": "object", "properties": {}, "additionalProperties": False}},
            "required": ["ok", "rows", "empty"]},
    },
    "required": ["name", "tags", "inner"],
}


@pytest.fixture(scope="module")
def backend(tokenizer):
    return make_backend("llguidance", tokenizer, VOCAB, {tokenizer.eos_token_id})


@pytest.mark.parametrize("layout, indent", [("indent2", 2), ("indent4", 4)])
@pytest.mark.parametrize("jump_forward", [True, False])
def test_random_walks_write_json_dumps_indent_exactly(backend, tokenizer, layout, indent, jump_forward):
    for seed in range(12):
        proc = backend_processor(backend, json_schema=SCHEMA, json_layout=layout, jump_forward=jump_forward)
        result = simulate_decode(proc, VOCAB, seed=seed, max_steps=600, eos_token_ids={tokenizer.eos_token_id})
        text = tokenizer.decode(result.token_ids)
        assert result.finished and proc.violation is None, text
        assert json.dumps(json.loads(text), indent=indent) == text
        assert proc.checker.check(text).valid


def test_layout_machine_rejects_each_misplaced_whitespace():
    start = LayoutState.start(2)
    assert start.advance('{\n  "a": 1\n}').finished
    assert start.advance("[]").finished and start.advance("{}").finished
    for wrong in ('{"a"', '{\n "a"', '{\n  "a": 1}', '{\n  "a": 1,"b"', '[\n  \n]', '{\n  "a": 1\n  }', '[1]'):
        assert start.advance(wrong) is None, wrong
    assert start.advance('{\n  "a": "x,\\"{y"\n}').finished  # structure inside strings is text


def test_outlines_backend_refuses_indented_layouts(tokenizer):
    outlines = make_backend("outlines", tokenizer, VOCAB, {tokenizer.eos_token_id})
    with pytest.raises(ConstraintError, match="llguidance"):
        backend_processor(outlines, json_schema=SCHEMA, json_layout="indent2")
    with pytest.raises(ConstraintError, match="json_layout"):
        backend_processor(outlines, json_schema=SCHEMA, json_layout="indent3")


def test_engine_generates_indented_json(llama_path):
    with sglite.Engine(str(llama_path), device="cpu", max_total_tokens=4096) as engine:
        outs = engine.generate(["Data:"] * 4, [{"json_schema": SCHEMA, "json_layout": "indent2", "temperature": 1.0,
                                                "seed": seed, "max_new_tokens": 300} for seed in range(4)])
    for out in outs:
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out["text"]
        assert json.dumps(json.loads(out["text"]), indent=2) == out["text"]
        assert out["meta_info"]["schema_valid"] is True
