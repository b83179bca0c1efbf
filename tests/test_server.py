"""The OpenAI-compatible server through the real ``openai`` SDK on loopback, on the tiny Llama checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from sglite.runtime.server import ServerConfig
from sglite.runtime.server.testing import serve_in_thread

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def greedy_chat(client, **kwargs):
    return client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, **kwargs)


def test_models_list_names_the_served_model(client, engine):
    models = client.models.list().data
    assert [m.id for m in models] == [Path(engine.model_path).name]


def test_chat_completion_matches_the_engine_on_the_templated_prompt(client, engine):
    response = greedy_chat(client, max_tokens=6)
    prompt_ids = engine.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    expected = engine.generate(prompt_ids, {"max_new_tokens": 6, "temperature": 0})
    choice = response.choices[0]
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant"
    assert choice.message.content == expected["text"]
    assert choice.finish_reason == "length"
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.usage.completion_tokens == 6
    assert response.usage.total_tokens == len(prompt_ids) + 6


def test_repeated_prompt_reports_cached_tokens(client):
    greedy_chat(client, max_tokens=2)
    again = greedy_chat(client, max_tokens=2)
    assert again.usage.prompt_tokens_details.cached_tokens > 0


def test_content_parts_and_developer_role_equal_plain_strings(client):
    parts = [
        {"role": "developer", "content": [{"type": "text", "text": "You are "}, {"type": "text", "text": "terse."}]},
        {"role": "user", "content": "Name a colour."},
    ]
    a = client.chat.completions.create(model="tiny", messages=parts, temperature=0, max_tokens=5)
    b = greedy_chat(client, max_tokens=5)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_stop_string_ends_the_output_before_it(client):
    full = greedy_chat(client, max_tokens=12).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), f"degenerate generation {full!r}"
    stopped = greedy_chat(client, max_tokens=12, stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.message.content == full[: full.index(stop)]


def test_max_completion_tokens_wins_over_max_tokens(client):
    response = greedy_chat(client, max_tokens=9, max_completion_tokens=3)
    assert response.usage.completion_tokens == 3


def test_n_choices_with_a_seed_are_reproducible_and_distinct(client):
    def sample():
        return client.chat.completions.create(model="tiny", messages=CHAT, n=3, seed=7, temperature=1.0, max_tokens=8, extra_body={"ignore_eos": True}
            )

    first, second = sample(), sample()
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in second.choices]
    assert len(set(texts)) > 1, "each choice should get its own seed"
    assert first.usage.completion_tokens == 24


def test_chat_logprobs_have_the_requested_alternatives(client):
    response = greedy_chat(client, max_tokens=5, logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert len(content) == 5
    assert "".join(bytes(t.bytes).decode("utf-8", "replace") for t in content) == response.choices[0].message.content
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert token.token == token.top_logprobs[0].token
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob, abs=1e-4)


def test_streaming_chat_chunks_have_openai_shape(client):
    plain = greedy_chat(client, max_tokens=8).choices[0].message.content
    chunks = list(greedy_chat(client, max_tokens=8, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_streamed_sse_ends_with_done(server):
    body = {"messages": CHAT, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    json.loads(events[-2].removeprefix("data: "))


def test_streaming_n_choices_interleave_to_the_same_texts(client):
    kwargs = dict(n=2, seed=3, temperature=1.0, max_tokens=6)
    whole = client.chat.completions.create(model="tiny", messages=CHAT, **kwargs)
    texts = ["", ""]
    for chunk in client.chat.completions.create(model="tiny", messages=CHAT, stream=True, **kwargs):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in whole.choices]


def test_response_format_json_schema_output_validates(client):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "L"]}},
        "required": ["name", "ok", "size"],
        "additionalProperties": False,
    }
    response = client.chat.completions.create(
        model="tiny",
        messages=CHAT,
        max_tokens=80,
        temperature=0.7,
        seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "item", "schema": schema, "strict": True}},
    )
    assert response.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(response.choices[0].message.content), schema)


def test_regex_extension_constrains_the_output(client):
    for seed in range(3):
        response = greedy_chat(client, max_tokens=10, seed=seed, extra_body={"regex": "(yes|no)"})
        assert response.choices[0].message.content in ("yes", "no")


def test_invalid_regex_is_a_bad_request(client):
    with pytest.raises(openai.BadRequestError) as err:
        greedy_chat(client, max_tokens=4, extra_body={"regex": "(unclosed"})
    assert err.value.status_code == 400 and err.value.body["message"]


def test_completions_prompt_forms_and_echo(client, engine):
    ids = engine.tokenizer.encode("def add(a, b):")
    by_text = client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=5, temperature=0)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0)
    assert by_text.object == "text_completion" and by_text.choices[0].text == by_ids.choices[0].text
    batch = client.completions.create(model="tiny", prompt=["def add(a, b):", "import os"], max_tokens=5, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == by_text.choices[0].text
    assert batch.usage.prompt_tokens == len(ids) + len(engine.tokenizer.encode("import os"))
    batch_ids = client.completions.create(model="tiny", prompt=[ids, ids], max_tokens=5, temperature=0, n=2)
    assert len(batch_ids.choices) == 4
    echoed = client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == "def add(a, b):" + by_text.choices[0].text


def test_completions_default_to_16_tokens(client):
    response = client.completions.create(model="tiny", prompt="import", temperature=0, extra_body={"ignore_eos": True})
    assert response.usage.completion_tokens == 16


def test_legacy_logprobs_format_with_echo(client, engine):
    prompt = "for i in range(10):"
    n_prompt = len(engine.tokenizer.encode(prompt))
    response = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, logprobs=2, echo=True)
    lp = response.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n_prompt + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert "".join(lp.tokens) == response.choices[0].text
    for position in range(n_prompt, n_prompt + 4):
        assert lp.tokens[position] in lp.top_logprobs[position] and len(lp.top_logprobs[position]) <= 3


def test_streaming_completions_concatenate_to_the_whole_response(client):
    kwargs = dict(model="tiny", prompt="class Point:", max_tokens=7, temperature=0, logprobs=1)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    streamed_tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed_tokens == whole.choices[0].logprobs.tokens
    streamed_offsets = [o for c in chunks if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert streamed_offsets == whole.choices[0].logprobs.text_offset
    assert chunks[-1].usage.completion_tokens == 7


def test_native_generate_single_batch_and_stream(server, engine):
    params = {"max_new_tokens": 5, "temperature": 0}
    single = httpx.post(f"{server}/generate", json={"text": "import sys", "sampling_params": params}, timeout=60).json()
    assert single == {**single, "text": engine.generate("import sys", params)["text"]}
    assert single["meta_info"]["completion_tokens"] == 5
    batch = httpx.post(
        f"{server}/generate", json={"input_ids": [[283, 78], [365]], "sampling_params": params, "return_logprob": True}, timeout=60
    ).json()
    assert len(batch) == 2 and all(len(out["meta_info"]["output_token_logprobs"]) == 5 for out in batch)
    body = {"text": "import sys", "sampling_params": params, "stream": True}
    with httpx.stream("POST", f"{server}/generate", json=body, timeout=60) as response:
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["text"] == single["text"]  # SGLang's stream format: cumulative text per event


def test_native_generate_rejects_bad_sampling_params(server):
    response = httpx.post(f"{server}/generate", json={"text": "x", "sampling_params": {"max_new_tokens": -1}})
    assert response.status_code == 400 and "max_new_tokens" in response.json()["error"]["message"]


def test_health_and_metrics(server, client):
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    greedy_chat(client, max_tokens=3, stream=True).close()
    greedy_chat(client, max_tokens=2)
    text = httpx.get(f"{server}/metrics").text
    for name in (
        'sglite_http_requests_total{route="/v1/chat/completions",status="200"}',
        "sglite_time_to_first_token_seconds_count",
        "sglite_inter_token_latency_seconds_bucket",
        "sglite_num_running_requests",
        "sglite_num_waiting_requests",
        "sglite_kv_pool_usage_ratio",
        "sglite_radix_cache_hit_rate",
        "sglite_prompt_tokens_total",
        "sglite_generation_tokens_total",
    ):
        assert name in text, name


def test_api_key_is_required_when_configured(engine):
    with serve_in_thread(engine, ServerConfig(api_key="sk-right", log_level="warning")) as url:
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        assert httpx.post(f"{url}/generate", json={"text": "x"}).status_code == 401
        right = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-right", max_retries=0)
        assert right.completions.create(model="tiny", prompt="x", max_tokens=1).usage.completion_tokens == 1
        assert httpx.get(f"{url}/health").status_code == 200  # probes need no key
        assert httpx.get(f"{url}/metrics").status_code == 200


def test_rate_limit_answers_429_with_retry_after(engine):
    with serve_in_thread(engine, ServerConfig(rate_limit=2, log_level="warning")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-a", max_retries=0)
        client.models.list()
        client.models.list()
        with pytest.raises(openai.RateLimitError) as err:
            client.models.list()
        assert int(err.value.response.headers["retry-after"]) >= 1
        # Limits are per client address: a made-up key does not buy a fresh bucket.
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="sk-b", max_retries=0).models.list()


def test_native_flush_cache_and_server_info(server, client, engine):
    assert httpx.post(f"{server}/flush_cache").status_code == 200  # the shared engine starts this test empty
    assert engine.get_stats()["cached_tokens_in_tree"] == 0
    greedy_chat(client, max_tokens=2)
    assert engine.get_stats()["cached_tokens_in_tree"] > 0  # this test's request, not an earlier one's
    assert httpx.post(f"{server}/flush_cache").status_code == 200
    assert engine.get_stats()["cached_tokens_in_tree"] == 0
    info = httpx.get(f"{server}/get_server_info").json()
    assert info["context_length"] == engine.context_length
    assert info["engine"]["max_total_tokens"] == 8192
    assert "api_key" not in info["server"] and info["server"]["auth"] is False
