"""``select`` scores every choice in one batched call; its numbers must equal transformers' log-softmax."""

from __future__ import annotations

import pytest
import torch

import sglite as sgl

PREFIX = "Question: is the sky blue?\nAnswer: "
CHOICES = ["yes", "no", "maybe not", "Yes!"]


@pytest.fixture(scope="module")
def hf_model(llama_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32).eval()


def token_logprobs(model, ids: list[int]) -> list[float]:
    """logp(ids[j] | ids[:j]) for j >= 1, straight from transformers."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[j - 1, ids[j]].item() for j in range(1, len(ids))]


@sgl.function
def answer(s, method):
    s += PREFIX + sgl.select("choice", choices=CHOICES, choices_method=method)


def run(runtime, method=sgl.token_length_normalized):
    return answer.run(method=method, backend=runtime)


def expected_entries(tokenizer, model, choice: str) -> list[tuple[float | None, int, str]]:
    """SGLang's select entries for one choice, from transformers: ``prefix + choice`` from two tokens
    before the prefix's end, the first without a logprob, dropped when the prefix ends with its text."""
    ids = tokenizer.encode(PREFIX + choice)
    start = max(len(tokenizer.encode(PREFIX)) - 2, 0)
    logprobs = token_logprobs(model, ids)
    entries = [(None, ids[start], tokenizer.decode([ids[start]]))]
    entries += [(logprobs[pos - 1], ids[pos], tokenizer.decode([ids[pos]])) for pos in range(start + 1, len(ids))]
    return entries[1:] if PREFIX.endswith(entries[0][2]) else entries


def test_select_entries_and_scores_match_sglangs_shape_and_transformers(runtime, hf_model):
    state = run(runtime)
    meta = state.get_meta_info("choice")
    tokenizer = runtime.get_tokenizer()
    for choice, scored, normalized in zip(CHOICES, meta["input_token_logprobs"], meta["normalized_prompt_logprobs"]):
        expected = expected_entries(tokenizer, hf_model, choice)
        assert [(tid, text) for _, tid, text in scored] == [(tid, text) for _, tid, text in expected]
        assert scored[0][0] is None  # the prefix's last token but one is reported, without a logprob
        values = [lp for lp, _, _ in expected if lp is not None]
        assert [lp for lp, _, _ in scored if lp is not None] == pytest.approx(values, abs=2e-3)
        assert normalized == pytest.approx(sum(values) / len(values), abs=2e-3)
    best = max(range(len(CHOICES)), key=lambda i: meta["normalized_prompt_logprobs"][i])
    assert state["choice"] == CHOICES[best]
    assert state.text() == PREFIX + CHOICES[best]


def test_select_scores_one_prefix_token_before_the_choice(runtime):
    # The prefix ends in a space that BPE merges into the next word (" yes" is one token): scoring from
    # two tokens before the prefix's end covers the merged token.
    tokenizer = runtime.get_tokenizer()
    meta = run(runtime).get_meta_info("choice")
    prefix_ids = tokenizer.encode(PREFIX)
    assert meta["logprob_start_len"] == len(prefix_ids) - 2
    for choice, scored in zip(CHOICES, meta["input_token_logprobs"]):
        joint = tokenizer.encode(PREFIX + choice)
        assert [tid for _, tid, _ in scored] == joint[len(prefix_ids) - 2 :]


def test_select_prefix_hits_the_cache(runtime):
    run(runtime)
    meta = run(runtime).get_meta_info("choice")
    assert meta["cached_tokens"] > 0


def test_greedy_token_selection_compares_tokens_in_order(runtime, hf_model):
    # The expected pick comes from transformers' numbers, not from the engine's own output: the choice
    # whose token logprobs, compared position by position, are largest first (a shorter choice continues
    # with its own mean, as in SGLang).
    tokenizer = runtime.get_tokenizer()
    rows = [[lp for lp, _, _ in expected_entries(tokenizer, hf_model, c) if lp is not None] for c in CHOICES]
    width = max(map(len, rows))
    padded = [r + [sum(r) / len(r)] * (width - len(r)) for r in rows]
    expected = CHOICES[padded.index(max(padded))]
    assert run(runtime, sgl.greedy_token_selection)["choice"] == expected
    assert answer.run(method=sgl.greedy, backend=runtime)["choice"] == expected


def test_unconditional_likelihood_normalized_uses_bare_choice_logprobs(runtime, hf_model):
    state = run(runtime, sgl.unconditional_likelihood_normalized)
    meta = state.get_meta_info("choice")
    scores = []
    for scored, bare in zip(meta["input_token_logprobs"], meta["unconditional_token_logprobs"]):
        ids = [tid for _, tid, _ in scored]
        assert [tid for _, tid, _ in bare] == ids
        expected_bare = [None] + token_logprobs(hf_model, ids)
        assert [lp for lp, _, _ in bare][1:] == pytest.approx(expected_bare[1:], abs=2e-3)
        diffs = [c[0] - (u[0] or 0.0) for c, u in zip(scored, bare) if c[0] is not None]
        scores.append(sum(diffs) / len(diffs))
    assert state["choice"] == CHOICES[scores.index(max(scores))]


def test_select_rejects_bad_choices():
    with pytest.raises(sgl.LangError, match="non-empty strings"):
        sgl.select("x", choices=[])
    with pytest.raises(sgl.LangError, match="non-empty strings"):
        sgl.select("x", choices=["a", ""])
