"""Tool calling on /v1/chat/completions through the real ``openai`` SDK on loopback (tiny Llama checkpoint).

The random model writes garbage, which is the point: a returned call must still parse and validate
against its function's schema, because it is generated under that schema."""

from __future__ import annotations

import json
import shutil

import jsonschema
import openai
import pytest

import sglite
from sglite.runtime.server.testing import serve_in_thread
from sglite.runtime.server.tools import FORMATS, call_schema, render_conversation, tool_format

WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 16},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "unit", "days"],
        "additionalProperties": False,
    },
}
SEARCH = {
    "name": "search",
    "parameters": {
        "type": "object",
        "properties": {"query": {"type": "string", "maxLength": 20}, "top": {"type": "boolean"}},
        "required": ["query", "top"],
        "additionalProperties": False,
    },
}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": SEARCH}]
SCHEMAS = {"get_weather": WEATHER["parameters"], "search": SEARCH["parameters"]}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(engine):
    with serve_in_thread(engine) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def assert_valid_call(call, allowed: set[str]) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in allowed
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return arguments


@pytest.mark.parametrize("seed", range(6))
def test_required_call_always_parses_and_matches_its_schema(client, seed):
    response = client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120, temperature=1.0, seed=seed
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    assert_valid_call(choice.message.tool_calls[0], {"get_weather", "search"})
    assert response.usage.completion_tokens > 0


def test_named_tool_choice_calls_that_function(client):
    for seed in range(3):
        response = client.chat.completions.create(
            model="tiny", messages=ASK, tools=TOOLS, max_tokens=120, temperature=1.0, seed=seed,
            tool_choice={"type": "function", "function": {"name": "search"}},
        )
        assert_valid_call(response.choices[0].message.tool_calls[0], {"search"})


def test_n_choices_each_carry_a_valid_call(client):
    response = client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120, temperature=1.0, n=3, seed=4
    )
    assert len(response.choices) == 3
    for choice in response.choices:
        assert_valid_call(choice.message.tool_calls[0], {"get_weather", "search"})


def test_tool_choice_none_and_auto_without_a_call_answer_text(client, engine):
    for choice in ("none", "auto"):
        response = client.chat.completions.create(
            model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=8, temperature=0
        )
        message = response.choices[0].message
        assert message.tool_calls is None and isinstance(message.content, str) and message.content
    # the tools are described in the prompt even with "none" (as OpenAI does)
    plain = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=1)
    with_tools = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=1)
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 40


def test_streamed_call_assembles_to_the_non_streamed_one(client):
    kwargs = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120, temperature=1.0, seed=9)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    name, arguments, finish = None, "", None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        if not chunk.choices:
            assert chunk.usage.completion_tokens > 0
            continue
        delta = chunk.choices[0].delta
        for call in delta.tool_calls or []:
            name = call.function.name or name
            arguments += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert (name, json.loads(arguments), finish) == (whole.function.name, json.loads(whole.function.arguments), "tool_calls")


def test_a_tool_result_turn_is_accepted_and_templated(client):
    first = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120, seed=1)
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    second = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=4, temperature=0)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    rendered = render_conversation(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
         {"role": "tool", "tool_call_id": call.id, "content": "21"}],
        [WEATHER], FORMATS["hermes"], native=False,
    )
    assert rendered[0]["role"] == "system" and "get_weather" in rendered[0]["content"]
    assert rendered[2]["content"].startswith("<tool_call>\n") and '"arguments"' in rendered[2]["content"]
    assert rendered[3] == {"role": "user", "content": "<tool_response>\n21\n</tool_response>"}


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "logprobs": True}, "logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, None),
    ],
)
def test_bad_tool_requests_are_400s(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4, **kwargs)
    if param:
        assert err.value.body["param"] == param


def test_the_tokenizers_own_tool_template_is_used(tmp_path, llama_path):
    """A template that renders ``tools`` itself gets them (and OpenAI-shaped tool turns) directly."""
    model = tmp_path / "tool-template-model"
    shutil.copytree(llama_path, model)
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (
        "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    config_path.write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    with sglite.Engine(str(model), max_total_tokens=4096) as engine, serve_in_thread(engine) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        response = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120, seed=2)
        assert_valid_call(response.choices[0].message.tool_calls[0], {"get_weather", "search"})
        expected = engine.tokenizer.apply_chat_template(ASK, tools=TOOLS, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert response.usage.prompt_tokens == len(expected)
        assert "TOOLS: get_weather search" in engine.tokenizer.decode(expected)


def test_llama3_templates_get_the_llama3_call_format():
    assert tool_format("{{ '<|python_tag|>' }}").name == "llama3"
    assert tool_format("{{ '<|im_start|>' }}").name == "hermes"
    schema = call_schema([WEATHER], "llama3")
    assert schema["required"] == ["name", "parameters"] and schema["properties"]["name"] == {"const": "get_weather"}
    assert set(call_schema([WEATHER, SEARCH], "hermes")) == {"anyOf"}
