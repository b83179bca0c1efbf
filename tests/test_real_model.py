"""The real default model (SmolLM2-135M-Instruct): the GGUF's dense path against transformers' own GGUF
loader, greedy parity with transformers, and quality on the demo's labelled sets.

One engine and one transformers model per module; every test is slow (CI runs them).
"""

from __future__ import annotations


import pytest
import torch

import sglite as sgl
from sglite.demo import (
    FIELDS,
    Person,
    classify_sentiment,
    extract_person,
    fields_correct,
    load_labelled,
    parse_answer,
)
from sglite.runtime.loading.gguf_loader import find_gguf, is_gguf

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain what a hash table is in one sentence.",
    "Give me a synonym for happy.",
    "How many legs does a spider have?",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def runtime(real_model_path):
    # dtype="float32": the dense path, greedy-identical to transformers (the default keeps the GGUF's blocks)
    backend = sgl.Runtime(real_model_path, dtype="float32")
    yield backend
    backend.shutdown()


@pytest.fixture(scope="module")
def hf_model(real_model_path):
    """transformers' float32 model: from the GGUF file through transformers' own GGUF loader when it is one."""
    from transformers import AutoModelForCausalLM

    if is_gguf(real_model_path):
        gguf = find_gguf(real_model_path)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(real_model_path, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def chat_ids(runtime) -> list[list[int]]:
    tokenizer = runtime.engine.tokenizer
    return [
        list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                           return_dict=False))
        for q in QUESTIONS
    ]


def _until_eos(ids: list[int], eos: set[int]) -> list[int]:
    for index, token in enumerate(ids):
        if token in eos:
            return ids[:index]
    return ids


def test_gguf_weights_equal_transformers_gguf_loader(real_model_path, runtime, hf_model):
    if not is_gguf(real_model_path):
        pytest.skip("real_model_path is not a GGUF file")
    from sglite.runtime.loading.gguf_model import load_gguf_model

    ours = load_gguf_model(find_gguf(real_model_path), dtype="float32")[0].state_dict()  # the dense path, unfused
    reference = hf_model.state_dict()
    assert len(ours) == 273 and set(ours) <= set(reference)  # 272 tensors in the file, plus the tied head
    worst = max((ours[name].float() - reference[name]).abs().max().item() for name in ours)
    assert worst == 0.0
    config = runtime.engine.model_config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.vocab_size) == (30, 576, 9, 3, 49152)
    # llama.cpp's "smollm" pre-tokenizer isolates digits: two spaces before a digit stay one token
    tokenizer = runtime.engine.tokenizer
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("x  5")) == ["x", "ĠĠ", "5"]
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)


@pytest.fixture(scope="module")
def expected_greedy(runtime, hf_model, chat_ids) -> list[list[int]]:
    """transformers' float32 greedy continuations of ``chat_ids``, cut at EOS."""
    eos = set(runtime.engine.eos_token_ids)
    expected = []
    with torch.no_grad():
        for ids in chat_ids:
            out = hf_model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                    eos_token_id=sorted(eos), pad_token_id=sorted(eos)[0])
            expected.append(_until_eos(out[0, len(ids):].tolist(), eos))
    return expected


def test_greedy_parity_with_transformers(real_model_path, runtime, expected_greedy, chat_ids):
    engine = runtime.engine
    eos = set(engine.eos_token_ids)
    expected = expected_greedy
    params = {"max_new_tokens": NEW_TOKENS, "temperature": 0}

    def ours(outputs):
        return [_until_eos(out["output_ids"], eos) for out in outputs]

    alone = ours([engine.generate(input_ids=ids, sampling_params=params) for ids in chat_ids])
    batched = ours(engine.generate(input_ids=chat_ids, sampling_params=params))
    warm = engine.generate(input_ids=chat_ids, sampling_params=params)
    assert all(out["meta_info"]["cached_tokens"] >= len(ids) - 1 for out, ids in zip(warm, chat_ids))
    with sgl.Engine(real_model_path, dtype="float32", disable_radix_cache=True) as no_cache:
        uncached = ours(no_cache.generate(input_ids=chat_ids, sampling_params=params))
    assert alone == expected
    assert batched == expected
    assert ours(warm) == expected
    assert uncached == expected
    assert "Paris" in engine.tokenizer.decode(alone[0])


@pytest.fixture(scope="module")
def extraction_scores(runtime) -> dict[str, tuple[int, int, int]]:
    """``{"constrained"|"free": (fields correct, valid JSON objects, fields total)}`` on the labelled bios."""
    bios = load_labelled("labelled_bios")
    scores = {}
    for mode, constrained in (("constrained", True), ("free", False)):
        states = extract_person.run_batch([{"text": b["text"], "constrained": constrained} for b in bios], backend=runtime)
        answers = [parse_answer(state["person"]) for state in states]
        if constrained:  # every constrained answer is a valid Person
            assert all(Person.model_validate_json(state["person"]) for state in states)
        correct = sum(fields_correct(answer, bio) for answer, bio in zip(answers, bios))
        scores[mode] = (correct, sum(a is not None for a in answers), len(FIELDS) * len(bios))
    return scores


def test_constrained_extraction_is_mostly_correct(extraction_scores):
    correct, valid, total = extraction_scores["constrained"]
    assert total >= 60 and valid == total // len(FIELDS)
    assert correct >= 0.8 * total, extraction_scores


def test_constrained_extraction_at_least_as_accurate_as_free_text(extraction_scores):
    assert extraction_scores["constrained"][0] >= extraction_scores["free"][0], extraction_scores


def test_select_classifies_sentiment(runtime):
    reviews = load_labelled("labelled_sentiment")
    states = classify_sentiment.run_batch([{"text": r["text"]} for r in reviews], backend=runtime)
    assert len(reviews) >= 20
    right = sum(state["label"] == review["label"] for state, review in zip(states, reviews))
    assert right >= 0.8 * len(reviews)


def test_compiled_decode_greedy_parity_with_transformers(real_model_path, runtime, expected_greedy, chat_ids):
    """``enable_torch_compile`` (frozen weights, autotuned GEMM kernels) keeps float32 greedy output identical."""
    eos = set(runtime.engine.eos_token_ids)
    params = {"max_new_tokens": NEW_TOKENS, "temperature": 0}
    with sgl.Engine(real_model_path, dtype="float32", enable_torch_compile=True) as compiled:
        batched = compiled.generate(input_ids=chat_ids, sampling_params=params)
        steps = compiled.runner.compiled_decode.steps
    assert [_until_eos(out["output_ids"], eos) for out in batched] == expected_greedy
    assert steps >= NEW_TOKENS // 2  # the decode steps ran through the compiled graph
