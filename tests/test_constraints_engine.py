"""Constraints through ``sglite.Engine``: batched with free requests, and jump-forward saves forwards."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

import sglite
from sglite.constraints import ConstraintError

EXTRACTION = {
    "type": "object",
    "properties": {
        "customer_name": {"type": "string", "maxLength": 6},
        "customer_email_verified": {"type": "boolean"},
        "shipping_priority": {"enum": ["standard_delivery", "express_delivery"]},
        "order_quantity": {"type": "integer", "minimum": 1, "maximum": 9},
    },
    "required": ["customer_name", "customer_email_verified", "shipping_priority", "order_quantity"],
}
DATE = r"\d{4}-\d{2}-\d{2}"


@pytest.fixture(scope="module")
def engine(llama_path):
    with sglite.Engine(str(llama_path), device="cpu", max_total_tokens=8192) as engine:
        yield engine


@pytest.fixture(scope="module")
def engine_without_jump_forward(llama_path):
    with sglite.Engine(str(llama_path), device="cpu", max_total_tokens=8192, jump_forward=False) as engine:
        yield engine


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_constrained_and_free_requests_share_a_batch(engine, temperature):
    prompts = ["Date:", "Tell me a story", "JSON:", "Answer:", "Free"]
    params = [
        {"regex": DATE, "temperature": temperature, "max_new_tokens": 32},
        {"temperature": temperature, "max_new_tokens": 12},
        {"json_schema": json.dumps(EXTRACTION), "temperature": temperature, "max_new_tokens": 96},
        {"choices": ["yes", "no", "maybe"], "temperature": temperature, "max_new_tokens": 8},
        {"temperature": temperature, "max_new_tokens": 12, "ignore_eos": True},
    ]
    date, free, doc, answer, free_again = engine.generate(prompts, params)
    assert re.fullmatch(DATE, date["text"]) and date["meta_info"]["finish_reason"]["type"] == "stop"
    jsonschema.validate(json.loads(doc["text"]), EXTRACTION)
    assert answer["text"] in ("yes", "no", "maybe")
    assert free_again["meta_info"]["completion_tokens"] == 12  # unconstrained rows are untouched
    assert doc["meta_info"]["jump_forward_tokens"] > 20


def test_pydantic_style_schema_dict_and_stream(engine):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                               "maximum": 50}},
              "required": ["ok", "n"]}
    chunks = list(engine.generate("Status:", {"json_schema": schema, "max_new_tokens": 32}, stream=True))
    text = "".join(chunk["text"] for chunk in chunks)
    assert chunks[-1]["finished"]
    jsonschema.validate(json.loads(text), schema)


def test_bad_constraints_raise_before_queueing(engine):
    with pytest.raises(ConstraintError, match="position"):
        engine.generate("x", {"regex": "(ab"})
    with pytest.raises(ValueError, match="JSON"):
        engine.generate("x", {"json_schema": '{"type": '})
    out = engine.generate("still serving", {"regex": "ok|fine", "max_new_tokens": 4})
    assert out["text"] in ("ok", "fine")


@pytest.mark.slow
def test_jump_forward_makes_fewer_forward_calls(engine, engine_without_jump_forward):
    prompts = [f"Order {i}:" for i in range(3)]
    params = {"json_schema": json.dumps(EXTRACTION), "temperature": 1.0, "max_new_tokens": 128, "seed": 7}
    calls, forced = {}, {}
    for name, eng in (("on", engine), ("off", engine_without_jump_forward)):
        before = eng.get_stats()["forward_calls"]
        outs = eng.generate(prompts, params)
        calls[name] = eng.get_stats()["forward_calls"] - before
        forced[name] = sum(o["meta_info"]["jump_forward_tokens"] for o in outs)
        for out in outs:
            jsonschema.validate(json.loads(out["text"]), EXTRACTION)
    assert forced["off"] == 0 and forced["on"] > 60
    assert calls["on"] < calls["off"] * 0.6, calls


def test_a_finished_constraint_ends_the_request_before_min_new_tokens(engine):
    out = engine.generate("Answer:", {"regex": "yes|no", "min_new_tokens": 10, "max_new_tokens": 20, "temperature": 0})
    assert out["text"] in ("yes", "no")
    assert out["meta_info"]["finish_reason"]["type"] == "stop"
    engine.check_invariant()


TOOL_GRAMMAR = r"""
start: "call " NAME "(" ARG ")"
NAME: "get_weather" | "get_time"
ARG: /[a-z]{1,8}/
"""


def test_ebnf_sampling_param_and_strict_through_the_engine(engine):
    out = engine.generate("Tool:", {"ebnf": TOOL_GRAMMAR, "max_new_tokens": 32, "temperature": 1.0, "seed": 3})
    assert re.fullmatch(r"call (get_weather|get_time)\([a-z]{1,8}\)", out["text"])
    assert out["meta_info"]["finish_reason"]["type"] == "stop"
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3,
              "uniqueItems": True}
    with pytest.raises(ConstraintError, match="uniqueItems"):
        engine.generate("x", {"json_schema": schema, "strict": True})
    with pytest.warns(UserWarning, match="uniqueItems"):
        out = engine.generate("Digits:", {"json_schema": schema, "max_new_tokens": 32})
    items = json.loads(out["text"])
    assert out["meta_info"]["schema_valid"] is (len(set(items)) == len(items))


def test_lang_gen_grammar(runtime):
    import sglite as sgl

    @sgl.function
    def tool(s):
        s += "Tool: " + sgl.gen("call", grammar=TOOL_GRAMMAR, max_tokens=32, temperature=1.0)

    assert re.fullmatch(r"call (get_weather|get_time)\([a-z]{1,8}\)", tool.run(backend=runtime)["call"])


def test_outlines_backend_is_selectable(llama_path):
    with sglite.Engine(str(llama_path), device="cpu", max_total_tokens=2048, grammar_backend="outlines") as eng:
        out = eng.generate("JSON:", {"json_schema": EXTRACTION, "max_new_tokens": 96, "temperature": 1.0})
        jsonschema.validate(json.loads(out["text"]), EXTRACTION)
        with pytest.raises(ConstraintError, match="llguidance"):
            eng.generate("x", {"ebnf": TOOL_GRAMMAR})
    with pytest.raises(ValueError, match="grammar_backend"):
        sglite.Engine(str(llama_path), device="cpu", grammar_backend="xgrammar")


def test_server_takes_ebnf_and_refuses_unenforceable_keywords_with_400(engine):
    import httpx
    import openai

    from sglite.runtime.server.testing import serve_in_thread

    with serve_in_thread(engine) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        out = client.completions.create(model="tiny", prompt="Tool:", max_tokens=32, temperature=1.0, seed=1,
                                        extra_body={"ebnf": TOOL_GRAMMAR})
        assert re.fullmatch(r"call (get_weather|get_time)\([a-z]{1,8}\)", out.choices[0].text)
        native = httpx.post(f"{url}/generate", json={"text": "Tool:", "sampling_params": {
            "ebnf": TOOL_GRAMMAR, "max_new_tokens": 32, "temperature": 1.0}}, timeout=60).json()
        assert re.fullmatch(r"call (get_weather|get_time)\([a-z]{1,8}\)", native["text"])
        schema = {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           response_format={"type": "json_schema", "json_schema": {
                                               "name": "x", "schema": schema, "strict": True}})
        assert info.value.status_code == 400 and "uniqueItems" in str(info.value) and "/properties/tags" in str(info.value)
