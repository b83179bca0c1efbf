"""SGLang 0.5.x's native HTTP protocol (``/generate`` and friends) on loopback, on the tiny Llama checkpoint.

The field lists come from the installed ``sglang`` package itself, so a field SGLang adds is a failure here.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest

import sglite

PARAMS = {"max_new_tokens": 6, "temperature": 0}


def generate(server: str, **body) -> httpx.Response:
    return httpx.post(f"{server}/generate", json=body, timeout=120)


def stream_events(server: str, **body) -> list[dict]:
    with httpx.stream("POST", f"{server}/generate", json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200, response.read()
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def sglang_api_sampling_fields() -> dict[str, object]:
    """Every field of SGLang's ``SamplingParams`` with its default value (its server-filled ones too)."""
    msgspec = pytest.importorskip("msgspec")
    sampling = pytest.importorskip("sglang.srt.sampling.sampling_params")
    return {f.name: f.default for f in msgspec.structs.fields(sampling.SamplingParams)}


def test_model_info_and_server_info_routes(server, engine):
    for path in ("/get_model_info", "/model_info"):
        info = httpx.get(f"{server}{path}").json()
        assert info["model_path"] == engine.model_path and info["is_generation"] is True
        assert info["architectures"] == engine.model_config.architectures
    for path in ("/server_info", "/get_server_info"):
        info = httpx.get(f"{server}{path}").json()
        assert info["context_length"] == engine.context_length
        assert info["chunked_prefill_size"] == engine.config.chunked_prefill_size
        assert info["version"] == sglite.__version__
    assert httpx.get(f"{server}/health_generate", timeout=60).status_code == 200


def test_flush_cache_by_get_and_post(server, engine):
    generate(server, text="warm the cache", sampling_params=PARAMS)
    assert engine.get_stats()["cached_tokens_in_tree"] > 0
    assert httpx.get(f"{server}/flush_cache").status_code == 200
    assert engine.get_stats()["cached_tokens_in_tree"] == 0
    generate(server, text="warm the cache", sampling_params=PARAMS)
    assert httpx.post(f"{server}/flush_cache").status_code == 200
    assert engine.get_stats()["cached_tokens_in_tree"] == 0


def test_every_sglang_sampling_field_at_its_default_is_accepted(server):
    fields = sglang_api_sampling_fields()
    assert {"n", "stop_regex", "spaces_between_special_tokens", "no_stop_trim", "sampling_seed"} <= set(fields)
    params = {name: (list(v) if isinstance(v, (set, tuple)) else v) for name, v in fields.items()}
    params.update(max_new_tokens=4, temperature=0)
    response = generate(server, text="hello", sampling_params=params)
    assert response.status_code == 200, response.text
    assert response.json()["meta_info"]["completion_tokens"] == 4


def test_what_sglangs_client_sends_is_accepted(server):
    """The exact body ``sglang.RuntimeEndpoint.generate`` posts (global_config defaults included)."""
    ir = pytest.importorskip("sglang.lang.ir")
    sp = ir.SglSamplingParams(max_new_tokens=5, temperature=0)
    body = {
        "text": "The sky is",
        "sampling_params": {"skip_special_tokens": True, "spaces_between_special_tokens": True, **sp.to_srt_kwargs()},
    }
    out = json.loads(json.dumps(body))  # tuples become lists, as on the wire
    response = generate(server, **out)
    assert response.status_code == 200, response.text
    assert response.json()["meta_info"]["completion_tokens"] == 5


@pytest.mark.parametrize(
    "params, name",
    [({"beam_width": 2}, "beam_width"), ({"structural_tag": "{}"}, "structural_tag"), ({"logit_bias": {"1": 5.0}}, "logit_bias"),
     ({"stop_strs": ["x"]}, "stop_strs"), ({"is_normalized": True}, "is_normalized")],
)
def test_sglang_fields_that_would_change_the_output_are_refused_by_name(server, params, name):
    response = generate(server, text="x", sampling_params={**PARAMS, **params})
    assert response.status_code == 400 and name in response.json()["error"]["message"]


@pytest.mark.parametrize("field", ["image_data", "lora_path", "session_id", "custom_logit_processor"])
def test_unsupported_request_fields_are_refused_by_name(server, field):
    response = generate(server, text="x", sampling_params=PARAMS, **{field: "something"})
    assert response.status_code == 400 and field in response.json()["error"]["message"]
    # SGLang's clients send them as null: accepted
    assert generate(server, text="x", sampling_params=PARAMS, **{field: None}).status_code == 200


def test_stream_is_cumulative_text_with_logprob_deltas(server):
    whole = generate(server, text="import sys", sampling_params={**PARAMS, "max_new_tokens": 8}, return_logprob=True).json()
    events = stream_events(server, text="import sys", sampling_params={**PARAMS, "max_new_tokens": 8}, return_logprob=True)
    assert events[-1]["text"] == whole["text"] and events[-1]["output_ids"] == whole["output_ids"]
    previous, sent = "", 0
    for event in events:
        assert event["text"].startswith(previous)  # SGLang's client slices text[pos:]
        previous = event["text"]
        meta = event["meta_info"]
        assert meta["output_token_logprobs_length"] == meta["completion_tokens"] == len(event["output_ids"])
        assert len(meta["output_token_logprobs"]) == meta["completion_tokens"] - sent
        sent = meta["completion_tokens"]
    streamed = [e for event in events for e in event["meta_info"]["output_token_logprobs"]]
    expected = whole["meta_info"]["output_token_logprobs"]
    assert [e[1] for e in streamed] == [e[1] for e in expected]  # each entry exactly once, in order
    assert [e[0] for e in streamed] == pytest.approx([e[0] for e in expected], abs=1e-3)  # the stream hit the cache


def test_stream_with_prompt_logprobs_sends_them_once(server):
    events = stream_events(server, text="one two three four", sampling_params=PARAMS, return_logprob=True, logprob_start_len=0)
    prompt_entries = [e for event in events for e in event["meta_info"].get("input_token_logprobs", [])]
    whole = generate(server, text="one two three four", sampling_params=PARAMS, return_logprob=True, logprob_start_len=0).json()
    assert [e[1] for e in prompt_entries] == [e[1] for e in whole["meta_info"]["input_token_logprobs"]]
    assert len(prompt_entries) == whole["meta_info"]["prompt_tokens"]


def test_stop_regex_ends_and_trims_the_output(server, engine):
    free = generate(server, text="a b c d", sampling_params={**PARAMS, "max_new_tokens": 24, "ignore_eos": True}).json()["text"]
    # the first character of the free output, as a one-character regex class, must stop at once
    first = free.lstrip()[0]
    pattern = "[" + first.replace("\\", "\\\\").replace("]", "\\]").replace("^", "\\^") + "]"
    params = {**PARAMS, "max_new_tokens": 24, "ignore_eos": True, "stop_regex": pattern}
    out = generate(server, text="a b c d", sampling_params=params).json()
    cut = free.index(first)
    assert out["text"] == free[:cut]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": pattern}
    kept = generate(server, text="a b c d", sampling_params={**params, "no_stop_trim": True}).json()
    assert kept["text"] == free[: cut + 1]


def test_stop_regex_that_does_not_compile_is_a_400(server):
    response = generate(server, text="x", sampling_params={**PARAMS, "stop_regex": "(unclosed"})
    assert response.status_code == 400 and "stop_regex" in response.json()["error"]["message"]


def test_sampling_seed_is_sglangs_name_for_seed(server):
    params = {"max_new_tokens": 8, "temperature": 1.0, "ignore_eos": True}
    a = generate(server, text="seeded", sampling_params={**params, "sampling_seed": 7}).json()["text"]
    b = generate(server, text="seeded", sampling_params={**params, "seed": 7}).json()["text"]
    assert a == b


def test_n_answers_a_list_and_prefills_the_prompt_once(server, engine):
    prompt = "one prefill for all samples"  # shorter than the scheduler's in-batch prefix wait (32 tokens)
    assert httpx.post(f"{server}/flush_cache").status_code == 200
    before = engine.get_stats()["prefill_tokens_computed"]
    params = {"max_new_tokens": 6, "temperature": 1.0, "n": 4, "seed": 3, "ignore_eos": True}
    outs = generate(server, text=prompt, sampling_params=params).json()
    assert isinstance(outs, list) and len(outs) == 4
    prompt_tokens = outs[0]["meta_info"]["prompt_tokens"]
    computed = engine.get_stats()["prefill_tokens_computed"] - before
    assert computed == prompt_tokens + 3  # one prefill, then each other sample computes only the last prompt token
    assert len({o["text"] for o in outs}) > 1  # distinct samples
    again = generate(server, text=prompt, sampling_params=params).json()
    assert [o["text"] for o in again] == [o["text"] for o in outs]  # reproducible with a seed


def test_n_greedy_samples_are_equal_and_batches_are_prompt_major(server):
    outs = generate(server, text=["first prompt", "second prompt"], sampling_params={**PARAMS, "n": 3}).json()
    assert len(outs) == 6
    single = [generate(server, text=t, sampling_params=PARAMS).json()["text"] for t in ("first prompt", "second prompt")]
    assert [o["text"] for o in outs] == [single[0]] * 3 + [single[1]] * 3


def test_n_streams_carry_the_sample_index(server):
    events = stream_events(server, text="stream me", sampling_params={**PARAMS, "n": 2})
    assert {e["index"] for e in events} == {0, 1}
    finals = {e["index"]: e["text"] for e in events}
    whole = generate(server, text="stream me", sampling_params=PARAMS).json()["text"]
    assert finals == {0: whole, 1: whole}


def test_duplicate_rid_is_refused_without_hurting_the_request_that_holds_it(server):
    """hardening issue, item 3: the second "job-1" gets 400; the first runs to its full length."""
    body = {"text": "long job", "rid": "job-1", "stream": True,
            "sampling_params": {"max_new_tokens": 200, "temperature": 0, "ignore_eos": True}}
    first_event = threading.Event()
    events: list[dict] = []

    with httpx.stream("POST", f"{server}/generate", json=body, timeout=120) as first:
        assert first.status_code == 200
        lines = first.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
                first_event.set()
                break
        assert first_event.is_set()
        plain = generate(server, text="intruder", rid="job-1", sampling_params=PARAMS)
        assert plain.status_code == 400 and "job-1" in plain.json()["error"]["message"]
        with httpx.stream("POST", f"{server}/generate", json={**body, "text": "intruder"}, timeout=120) as dup:
            assert dup.status_code == 400  # refused before the 200 header, not mid-stream
            assert "job-1" in json.loads(dup.read())["error"]["message"]
        batch = generate(server, text=["a", "b"], rid=["job-2", "job-1"], sampling_params=PARAMS)
        assert batch.status_code == 400
        for line in lines:
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line.removeprefix("data: ")))
    final = events[-1]["meta_info"]
    assert final["completion_tokens"] == 200 and final["finish_reason"]["type"] == "length"
    # the id is free again once its request finished
    assert generate(server, text="reuse", rid="job-1", sampling_params=PARAMS).status_code == 200


def test_sglangs_client_guesses_no_chatml_for_smollm2_so_the_docs_name_it(real_model_path):
    """docs/compatibility.md: SGLang picks its template from /get_model_info's model_path alone, and no
    pattern matches SmolLM2; ``chat_template_name="chatml"`` gives the template sglite uses for it."""
    chat_template = pytest.importorskip("sglang.lang.chat_template")
    from sglite.lang.chat_template import get_chat_template

    assert chat_template.get_chat_template_by_model_path(str(real_model_path)).name == "default"
    theirs, ours = chat_template.get_chat_template("chatml"), get_chat_template("chatml")
    for role in ("system", "user", "assistant"):
        assert theirs.role_prefix_and_suffix[role] == (ours.role_prefix([], role), ours.role_suffix([], role))
