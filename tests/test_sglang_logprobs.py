"""SGLang's logprob contract (docs/compatibility.md) and its ``GenerateReqInput`` field rule, on the tiny
Llama checkpoint: numbers against transformers, counts against the code in SGLang's installed frontend
that reads them, and every request field SGLang 0.5.23 defines (read from its source at test time).
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import httpx
import pytest
import torch

from sglite.runtime.server.native_protocol import METADATA_FIELDS, NATIVE_UNSUPPORTED

GREEDY = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}
PROMPT = "one two three four five six"


@pytest.fixture(scope="module")
def hf_logprobs(llama_path):
    """``ids -> log_softmax`` rows of transformers' float32 forward (row j predicts token j + 1)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32).eval()

    def run(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)

    return run


def generate(server: str, **body) -> httpx.Response:
    return httpx.post(f"{server}/generate", json=body, timeout=120)


# ---- the engine: numbers ------------------------------------------------------------------------


@pytest.mark.parametrize("start", [0, 3])
def test_prompt_logprobs_from_start_match_transformers(engine, hf_logprobs, start):
    ids = engine.tokenizer.encode(PROMPT)
    out = engine.generate(ids, GREEDY, return_logprob=True, logprob_start_len=start, top_logprobs_num=3)
    meta = out["meta_info"]
    logp = hf_logprobs(ids)
    entries, tops = meta["input_token_logprobs"], meta["input_top_logprobs"]
    assert [t for _, t, _ in entries] == ids[start:]  # SGLang: origin_input_ids[logprob_start_len:]
    assert entries[0][0] is None and tops[0] is None  # SGLang's "[None] + logprobs[:-1]"
    assert [lp for lp, _, _ in entries[1:]] == pytest.approx(
        [logp[pos - 1, ids[pos]].item() for pos in range(start + 1, len(ids))], abs=1e-4
    )
    for pos, row in zip(range(start + 1, len(ids)), tops[1:]):
        assert [t for _, t, _ in row] == logp[pos - 1].topk(3).indices.tolist()
    assert len(meta["output_token_logprobs"]) == len(meta["output_top_logprobs"]) == meta["completion_tokens"] == 4


def test_prompt_logprobs_after_a_cached_prefix_are_the_same(engine):
    ids = engine.tokenizer.encode(PROMPT)
    cold = engine.generate(ids, {"max_new_tokens": 0}, return_logprob=True, logprob_start_len=4)
    engine.generate(ids, {"max_new_tokens": 0})  # the whole prompt is cached now
    warm = engine.generate(ids, {"max_new_tokens": 0}, return_logprob=True, logprob_start_len=4)
    assert warm["meta_info"]["cached_tokens"] == 4  # the cache serves up to logprob_start_len, not further
    warm_entries, cold_entries = warm["meta_info"]["input_token_logprobs"], cold["meta_info"]["input_token_logprobs"]
    assert [e[1] for e in warm_entries] == [e[1] for e in cold_entries] and warm_entries[0][0] is None
    assert [e[0] for e in warm_entries[1:]] == pytest.approx([e[0] for e in cold_entries[1:]], abs=1e-4)


def test_max_new_tokens_zero_reports_the_next_token_distribution(engine, hf_logprobs):
    ids = engine.tokenizer.encode(PROMPT)
    out = engine.generate(ids, {"max_new_tokens": 0}, return_logprob=True, top_logprobs_num=5)
    meta = out["meta_info"]
    assert out["output_ids"] == [] and meta["completion_tokens"] == 0
    assert meta["output_token_logprobs"] == [] and meta["input_token_logprobs"] == []
    (row,) = meta["output_top_logprobs"]
    expected = hf_logprobs(ids)[-1].topk(5)
    assert [t for _, t, _ in row] == expected.indices.tolist()
    assert [lp for lp, _, _ in row] == pytest.approx(expected.values.tolist(), abs=1e-4)
    # without top_logprobs_num there is nothing to report
    plain = engine.generate(ids, {"max_new_tokens": 0}, return_logprob=True)["meta_info"]
    assert plain["output_token_logprobs"] == [] and "output_top_logprobs" not in plain


def test_max_new_tokens_one_reports_one_entry_per_list(engine):
    out = engine.generate(PROMPT, {"max_new_tokens": 1, "temperature": 0}, return_logprob=True, top_logprobs_num=2)
    meta = out["meta_info"]
    assert len(meta["output_token_logprobs"]) == len(meta["output_top_logprobs"]) == meta["completion_tokens"] == 1
    assert meta["output_top_logprobs"][0][0][:2] == pytest.approx(meta["output_token_logprobs"][0][:2])  # greedy: the top one


def test_logprob_start_len_past_the_prompt_is_refused(engine, server):
    ids = engine.tokenizer.encode(PROMPT)
    out = engine.generate(ids, {"max_new_tokens": 1}, return_logprob=True, logprob_start_len=len(ids))
    assert out["meta_info"]["input_token_logprobs"] == []  # == prompt length: empty, as in SGLang
    with pytest.raises(ValueError, match="logprob_start_len"):
        engine.generate(ids, {"max_new_tokens": 1}, return_logprob=True, logprob_start_len=len(ids) + 1)
    response = generate(server, input_ids=ids, sampling_params={"max_new_tokens": 1}, return_logprob=True,
                        logprob_start_len=len(ids) + 1)
    assert response.status_code == 400 and "logprob_start_len" in response.json()["error"]["message"]


# ---- over HTTP: SGLang's json_logprobs and cot_decoding shapes ----------------------------------


def test_json_logprobs_shape_with_a_regex_and_jump_forward(server):
    """SGLang's ``json_logprobs.py`` request (regex, prompt logprobs from 0, top 3, texts); the counts
    are SGLang 0.5.23's (``output_streamer``: one output entry per completion token)."""
    regex = r'\{"name": "[a-z]{1,6}", "house": "(Gryffindor|Slytherin)"\}'
    body = {"text": "Harry Potter is", "sampling_params": {"temperature": 0, "max_new_tokens": 64, "regex": regex},
            "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 3, "return_text_in_logprobs": True}
    out = generate(server, **body).json()
    meta = out["meta_info"]
    assert meta["jump_forward_tokens"] > 0  # the fixed JSON text was forced, and still has entries
    assert len(meta["input_token_logprobs"]) == len(meta["input_top_logprobs"]) == meta["prompt_tokens"]
    assert len(meta["output_token_logprobs"]) == len(meta["output_top_logprobs"]) == meta["completion_tokens"]
    assert meta["output_token_logprobs_length"] == meta["completion_tokens"]
    assert meta["input_top_logprobs"][0] is None and all(len(row) == 3 for row in meta["input_top_logprobs"][1:])
    assert "".join(text for _, _, text in meta["output_token_logprobs"]) == out["text"]
    assert all(isinstance(entry[2], str) for row in meta["output_top_logprobs"] for entry in row)


def test_cot_decoding_step_zero_over_http(server):
    body = {"text": "Question: 2 + 2?\nAnswer:", "sampling_params": {"max_new_tokens": 0},
            "return_logprob": True, "top_logprobs_num": 4, "return_text_in_logprobs": True}
    meta = generate(server, **body).json()["meta_info"]
    (row,) = meta["output_top_logprobs"]
    assert len(row) == 4 and all(isinstance(text, str) for _, _, text in row)
    assert sum(math.exp(lp) for lp, _, _ in row) <= 1.0 + 1e-6
    assert [lp for lp, _, _ in row] == sorted((lp for lp, _, _ in row), reverse=True)


def test_n_samples_each_carry_the_whole_contract(server):
    body = {"text": PROMPT, "sampling_params": {**GREEDY, "n": 3}, "return_logprob": True, "logprob_start_len": 2,
            "top_logprobs_num": 2}
    outs = generate(server, **body).json()
    assert len(outs) == 3
    for out in outs:
        meta = out["meta_info"]
        assert len(meta["input_token_logprobs"]) == meta["prompt_tokens"] - 2
        assert len(meta["output_top_logprobs"]) == len(meta["output_token_logprobs"]) == 4
    assert outs[0]["meta_info"]["input_token_logprobs"] == outs[2]["meta_info"]["input_token_logprobs"]


def test_sglangs_select_reads_our_entries_like_its_own_server(server):
    """The code in SGLang's ``RuntimeEndpoint.select`` that reads ``input_token_logprobs``: the first
    entry's text (token healing) and ``compute_normalized_prompt_logprobs`` over the rest."""
    endpoint = pytest.importorskip("sglang.lang.backend.runtime_endpoint")
    prefix = "Is the sky blue? Answer:"
    prompt_len = generate(server, text=prefix, sampling_params={"max_new_tokens": 0}).json()["meta_info"]["prompt_tokens"]
    outs = generate(server, text=[prefix + " yes", prefix + " no"], sampling_params={"max_new_tokens": 0, "temperature": 0},
                    return_logprob=True, return_text_in_logprobs=True, logprob_start_len=max(prompt_len - 2, 0)).json()
    for out in outs:
        entries = out["meta_info"]["input_token_logprobs"]
        assert entries[0][0] is None and isinstance(entries[0][2], str)
        normalized = endpoint.compute_normalized_prompt_logprobs(entries)
        assert normalized == pytest.approx(sum(e[0] for e in entries[1:]) / (len(entries) - 1))


# ---- every GenerateReqInput field --------------------------------------------------------------


def sglang_generate_fields() -> dict[str, object]:
    """Every field of SGLang's ``GenerateReqInput`` with its default, read from the installed source
    (importing ``io_struct`` needs torchvision, which the compat extra leaves out)."""
    sglang = pytest.importorskip("sglang")
    source = Path(sglang.__file__).parent / "srt" / "managers" / "io_struct.py"
    tree = ast.parse(source.read_text())
    (cls,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "GenerateReqInput"]
    fields = {}
    for item in cls.body:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            value = item.value
            if isinstance(value, ast.Call):  # field(default=..., kw_only=True)
                value = next(k.value for k in value.keywords if k.arg == "default")
            fields[item.target.id] = ast.literal_eval(value) if value is not None else None
    return fields


HONOURED = {"text", "input_ids", "sampling_params", "stream", "return_logprob", "logprob_start_len",
            "top_logprobs_num", "return_text_in_logprobs", "rid"}


def test_every_generate_field_is_known():
    fields = sglang_generate_fields()
    assert len(fields) >= 70 and {"return_routed_experts", "priority", "cache_salt", "routing_key"} <= set(fields)
    assert set(fields) == HONOURED | set(METADATA_FIELDS) | set(NATIVE_UNSUPPORTED)


def test_every_generate_field_at_its_default_changes_nothing(server):
    fields = sglang_generate_fields()
    base = {"text": PROMPT, "sampling_params": GREEDY, "return_logprob": True, "top_logprobs_num": 2}
    plain = generate(server, **base).json()
    defaults = {k: v for k, v in fields.items() if k not in HONOURED}
    response = generate(server, **base, **defaults)
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["output_ids"] == plain["output_ids"] and out["text"] == plain["text"]
    tops = [[tid for _, tid, _ in row] for row in out["meta_info"]["output_top_logprobs"]]
    assert tops == [[tid for _, tid, _ in row] for row in plain["meta_info"]["output_top_logprobs"]]


@pytest.mark.parametrize("name", sorted(NATIVE_UNSUPPORTED))
def test_generate_fields_sglite_cannot_honour_are_refused_by_name(server, name):
    value = True if sglang_generate_fields()[name] is False else 7
    response = generate(server, text="x", sampling_params={"max_new_tokens": 1}, **{name: value})
    assert response.status_code == 400, name
    error = response.json()["error"]
    assert f"'{name}'" in error["message"]


def test_metadata_fields_are_accepted_at_any_value(server):
    body = {"no_logs": True, "custom_labels": {"team": "a"}, "routing_key": "k", "conversation_id": "c",
            "external_trace_header": {"traceparent": "00-x"}, "received_time": 1.5, "log_metrics": False}
    assert set(body) | {"modalities"} == set(METADATA_FIELDS)
    plain = generate(server, text=PROMPT, sampling_params=GREEDY).json()
    tagged = generate(server, text=PROMPT, sampling_params=GREEDY, modalities=["text"], **body).json()
    assert tagged["output_ids"] == plain["output_ids"]


def test_bench_servings_generate_body_is_accepted(server):
    """What ``sglang.bench_serving --backend sglang`` posts (benchmark/serving.py), warm-up included."""
    body = {"text": PROMPT, "sampling_params": {"temperature": 0.0, "max_new_tokens": 4, "ignore_eos": True},
            "stream": False, "lora_path": None, "return_logprob": False, "return_routed_experts": False,
            "logprob_start_len": -1}
    response = generate(server, **body)
    assert response.status_code == 200, response.text
    assert response.json()["meta_info"]["completion_tokens"] == 4
    refused = generate(server, **{**body, "return_routed_experts": True})
    assert refused.status_code == 400 and "return_routed_experts" in refused.json()["error"]["message"]
