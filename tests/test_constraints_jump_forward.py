"""Jump-forward: text the constraint forces is appended without sampling, and stays valid."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from sglite.constraints import build_logits_processor
from sglite.constraints.jump_forward import forced_bytes
from constraint_simulation import simulate_decode

VOCAB = 2048

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


def run(tokenizer, seed: int, jump_forward: bool, **constraint):
    proc = build_logits_processor(tokenizer, VOCAB, backend="outlines", jump_forward=jump_forward, **constraint)
    result = simulate_decode(proc, VOCAB, seed=seed, max_steps=300, eos_token_ids={tokenizer.eos_token_id})
    assert result.finished
    return proc, result, tokenizer.decode(result.token_ids)


@pytest.mark.parametrize("seed", range(4))
def test_schema_extraction_saves_steps(tokenizer, seed):
    on_proc, on, on_text = run(tokenizer, seed, True, json_schema=EXTRACTION)
    off_proc, off, off_text = run(tokenizer, seed, False, json_schema=EXTRACTION)
    for text in (on_text, off_text):
        jsonschema.validate(json.loads(text), EXTRACTION)
    assert on_proc.jump_forward_tokens == on.forced > 20  # the keys, quotes and colons
    assert off_proc.jump_forward_tokens == off.forced == 0
    assert on.steps < off.steps / 2


def test_forced_bytes_follow_the_schema(tokenizer):
    proc = build_logits_processor(tokenizer, VOCAB, backend="outlines", json_schema=EXTRACTION)
    # Nothing is forced before the first token: the engine samples it from the prefill logits.
    assert forced_bytes(proc.fsm, proc.state) == b'{"customer_name": "'
    proc.accept_token(tokenizer.convert_tokens_to_ids("{"))
    forced = proc.forced_tokens()
    assert tokenizer.decode(forced) == '"customer_name": "'
    assert forced == tokenizer.encode('"customer_name": "', add_special_tokens=False)  # the tokenizer's split
    assert proc.forced_tokens() == []  # a string's content is free


def test_enum_common_prefix_is_forced(tokenizer):
    proc = build_logits_processor(tokenizer, VOCAB, backend="outlines", choices=["standard_delivery", "standard_pickup"])
    proc.accept_token(tokenizer.encode("st", add_special_tokens=False)[0])
    assert tokenizer.decode(proc.forced_tokens()).startswith("andard_")
    assert forced_bytes(proc.fsm, proc.state) == b""


def test_literal_is_one_step(tokenizer):
    _, result, text = run(tokenizer, 0, True, regex="The quick brown fox jumps over the lazy dog")
    assert text == "The quick brown fox jumps over the lazy dog"
    assert result.steps == 1 and result.forced >= 5


def test_alternatives_are_not_forced(tokenizer):
    proc = build_logits_processor(tokenizer, VOCAB, backend="outlines", regex=r"(yes|no)")
    assert proc.forced_tokens() == []
    assert forced_bytes(proc.fsm, proc.state) == b""


def test_special_token_text_falls_back_to_greedy_walk(tokenizer):
    # tokenizer.encode turns "<|im_end|>" into the EOS id, which the FSM forbids mid-text.
    proc, result, text = run(tokenizer, 0, True, regex=r"a<\|im_end\|>b")
    assert tokenizer.eos_token_id not in result.token_ids
    assert text == "a<|im_end|>b" and result.steps == 1


def test_partial_utf8_prefix_is_forced_bytewise(tokenizer):
    # "é" and "è" share their first UTF-8 byte; only that byte is forced.
    for seed in range(4):
        _, _, text = run(tokenizer, seed, True, choices=["é1", "è2"])
        assert text in ("é1", "è2")


@pytest.mark.parametrize("seed", range(3))
def test_sentencepiece_forced_text(sp_tokenizer, seed):
    proc, result, text = run(sp_tokenizer, seed, True, json_schema=EXTRACTION)
    jsonschema.validate(json.loads(text), EXTRACTION)
    assert result.forced > 20
    space = sp_tokenizer.convert_tokens_to_ids("\u2581")
    assert space not in result.token_ids  # the normalizer's "▁" prefix is never forced


@pytest.mark.parametrize("regex", [r"\{\"id\": \d{1,3}, \"ok\": (true|false)\}", r"(ab){3}c|(ab){3}d"])
def test_jump_forward_output_matches(tokenizer, regex):
    for seed in range(4):
        _, _, text = run(tokenizer, seed, True, regex=regex)
        assert re.fullmatch(regex, text)
