"""The decode path: short requests decoding beside long ones read only their own context, and stay
token-identical to transformers (float32), with the radix cache on or off."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

import sglite
from sglite.runtime.kv_pool import KVSlotPool
from sglite.runtime.forward_batch import ForwardBatch
from sglite.runtime.loading.model_loader import load_model
from sglite.runtime.models.attention import MIN_KV_BUCKET, AttentionMetadata
from sglite.runtime.kernels.thread_tuner import ThreadTuner

SHORT, LONG = 12, 700  # prompt lengths in tokens
STEPS = 12


def decode_batch(contexts: list[int]) -> ForwardBatch:
    """One decode step for sequences whose ``contexts[i]`` tokens are cached in disjoint slot ranges."""
    starts = [sum(contexts[:i]) + i for i in range(len(contexts))]
    slots = [torch.arange(s, s + n + 1) for s, n in zip(starts, contexts)]
    return ForwardBatch(
        input_ids=torch.zeros(len(contexts), dtype=torch.int64),
        positions=torch.tensor(contexts),
        out_slots=torch.stack([s[-1] for s in slots]),
        prefix_lens=list(contexts),
        extend_lens=[1] * len(contexts),
        kv_slots=slots,
    )


def test_short_decodes_read_their_own_context_not_the_longest():
    contexts = [20] * 30 + [1100, 3000] + [300] * 4
    meta = AttentionMetadata.from_batch(decode_batch(contexts))
    for group in meta.groups:
        keys = group.kv_lens.tolist()
        # within a group, padding stays under 2x of the shortest member (or the small-context floor)
        assert group.kv_index.shape[1] <= max(2 * min(keys), MIN_KV_BUCKET)
    needed = sum(max(n + 1, MIN_KV_BUCKET) for n in contexts)
    assert meta.padded_kv_positions <= 2 * needed
    assert meta.padded_kv_positions * 5 < len(contexts) * (max(contexts) + 1)  # what padding to the longest reads
    assert sorted(i for g in meta.groups for i in (g.token_rows.tolist() if g.token_rows is not None else [])) == list(
        range(len(contexts))
    )


def prompts(vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [SHORT, LONG, SHORT + 3, SHORT + 5, LONG + 40, SHORT - 4]
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def reference(llama_path):
    model = AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    ids = prompts(model.config.vocab_size)
    with torch.inference_mode():
        outputs = [
            model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=STEPS, pad_token_id=0)[0, len(p) :].tolist()
            for p in ids
        ]
    return ids, outputs


@pytest.mark.parametrize("fused", [False, True], ids=["checkpoint-layout", "fused-projections"])
@torch.inference_mode()
@pytest.mark.slow
def test_mixed_long_and_short_decode_matches_transformers(llama_path, reference, fused):
    ids, expected = reference
    model, _ = load_model(llama_path)
    if fused:
        model.fuse_projections()
        assert model.model.layers[0].self_attn.qkv_proj is not None and model.model.layers[0].mlp.gate_proj is None
    pool = KVSlotPool(4096, model.num_layers, model.num_kv_heads, model.head_dim)
    slots = [pool.alloc(len(p) + STEPS) for p in ids]
    sequences = [list(p) for p in ids]
    for p, s, seq in zip(ids, slots, sequences):  # prefill each alone
        batch = ForwardBatch(torch.tensor(p), torch.arange(len(p)), s[: len(p)], [0], [len(p)], [s[: len(p)]])
        seq.append(int(model.compute_logits(model(batch, pool)[-1:]).argmax()))
    for _ in range(STEPS - 1):  # then decode all together: short and long contexts in one forward
        contexts = [len(seq) - 1 for seq in sequences]
        batch = ForwardBatch(
            input_ids=torch.tensor([seq[-1] for seq in sequences]),
            positions=torch.tensor(contexts),
            out_slots=torch.stack([s[n] for s, n in zip(slots, contexts)]),
            prefix_lens=contexts,
            extend_lens=[1] * len(sequences),
            kv_slots=[s[: n + 1] for s, n in zip(slots, contexts)],
        )
        assert len(AttentionMetadata.from_batch(batch).groups) > 1  # short and long contexts are split
        for seq, token in zip(sequences, model.compute_logits(model(batch, pool)).argmax(-1).tolist()):
            seq.append(token)
    assert [seq[len(p) :] for p, seq in zip(ids, sequences)] == expected


@pytest.mark.parametrize("cache", ["on", "off"])
@pytest.mark.slow
def test_engine_mixed_long_and_short_prompts_match_transformers(llama_path, reference, cache):
    ids, expected = reference
    params = {"max_new_tokens": STEPS, "temperature": 0, "ignore_eos": True}
    with sglite.Engine(
        str(llama_path), max_total_tokens=4096, chunked_prefill_size=256, disable_radix_cache=cache == "off"
    ) as engine:
        outputs = engine.generate(input_ids=ids, sampling_params=params)
        again = engine.generate(input_ids=ids[:2], sampling_params=params)  # cache on: served from the tree
        engine.check_invariant()
    assert [o["output_ids"] for o in outputs] == expected
    assert [o["output_ids"] for o in again] == expected[:2]
    if cache == "on":
        assert again[1]["meta_info"]["cached_tokens"] >= LONG - 1


def test_thread_tuner_keeps_the_faster_count_per_size_and_follows_load():
    tuner = ThreadTuner(candidates=(1, 2), trials=3, recheck_every=10)
    cost = {(1, 1): 0.01, (1, 2): 0.03, (512, 1): 0.40, (512, 2): 0.25}  # decode: 1 thread wins; prefill: 2

    def run(tokens: int, steps: int) -> list[int]:
        chosen = []
        for _ in range(steps):
            threads = tuner.choose(tokens)
            tuner.record(tokens, threads, cost[(tokens, threads)])
            chosen.append(threads)
        return chosen

    assert sorted(run(1, 6)) == [1, 1, 1, 2, 2, 2]  # each candidate timed `trials` times first
    assert sorted(run(512, 6)) == [1, 1, 1, 2, 2, 2]
    assert run(1, 3) == [1, 1, 1] and run(512, 3) == [2, 2, 2]
    assert tuner.chosen() == {1: 1, 512: 2}
    cost[(1, 1)] = 0.05  # the machine got busier: one thread now loses at decode too
    later = run(1, 40)
    assert later[-5:] == [2] * 5


def test_engine_threads_are_tuned_on_its_own_thread(llama_path):
    before = torch.get_num_threads()
    seen: list[int] = []
    with sglite.Engine(str(llama_path), max_total_tokens=512) as engine:
        forward = engine.runner.model.forward
        engine.runner.model.forward = lambda *args: (seen.append(torch.get_num_threads()), forward(*args))[1]
        engine.generate("def f(x):", {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True})
        assert torch.get_num_threads() == before
    if before > 1:  # both candidates were timed on the engine's step thread
        assert {1, before} <= set(seen)


@torch.inference_mode()
def test_forward_keep_rows_runs_the_last_layer_only_where_logits_are_taken(llama_path):
    model, _ = load_model(llama_path)
    model.fuse_projections()
    lengths = [9, 14, 5]  # three fresh prefills in one ragged batch
    slots = [torch.arange(64 * i, 64 * i + n) for i, n in enumerate(lengths)]
    batch = ForwardBatch(
        input_ids=torch.randint(3, 100, (sum(lengths),), generator=torch.Generator().manual_seed(0)),
        positions=torch.cat([torch.arange(n) for n in lengths]),
        out_slots=torch.cat(slots),
        prefix_lens=[0] * 3,
        extend_lens=lengths,
        kv_slots=slots,
    )
    last_rows = torch.tensor([8, 22, 27])  # each sequence's last token
    full_pool, kept_pool = (KVSlotPool(192, model.num_layers, model.num_kv_heads, model.head_dim) for _ in range(2))
    rows_seen = []
    hook = model.model.layers[-1].mlp.register_forward_hook(lambda mod, args, out: rows_seen.append(args[0].shape[0]))
    try:
        full = model(batch, full_pool)
        kept = model(batch, kept_pool, last_rows)
    finally:
        hook.remove()
    assert rows_seen == [sum(lengths), 3]  # the last layer's MLP ran on the three kept rows only
    torch.testing.assert_close(kept, full[last_rows], rtol=1e-5, atol=1e-5)
    assert torch.equal(kept_pool.kv, full_pool.kv)  # every token's K/V stored, in every layer
