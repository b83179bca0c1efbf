"""Prefill attention on CPU (``runtime/models/prefill_attention.py``): query blocks read only the keys
they may see, K/V are never expanded for GQA, and the result equals both the padded, masked SDPA
path it replaces and a plain softmax written out here, with and without a sliding window."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sglite.runtime.forward_batch import ForwardBatch
from sglite.runtime.kv_pool import KVSlotPool
from sglite.runtime.models import attention
from sglite.runtime.models.attention import AttentionMetadata, paged_attention
from sglite.runtime.models.prefill_attention import QUERY_BLOCK, query_blocks

HEAD_DIM = 16
# (prefix, extend) per sequence: fresh prompts and chunks over a cached prefix, of ragged lengths
# (several per bucket, so groups are padded on the reference path), plus decode steps beside them.
SEGMENTS = [(0, 150), (0, 140), (200, 70), (180, 90), (64, 128), (513, 9), (0, 2), (37, 3), (300, 1), (5, 1)]


def ragged_batch(segments: list[tuple[int, int]], seed: int = 0) -> ForwardBatch:
    """Sequences in shuffled, disjoint pool slots (so gathers are not contiguous ranges)."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(p + n for p, n in segments)
    free = (torch.randperm(total, generator=gen) + 1).tolist()  # slot 0 stays unused (padding target)
    kv_slots, out_slots, positions = [], [], []
    for prefix, n in segments:
        slots, free = torch.tensor(free[: prefix + n]), free[prefix + n :]
        kv_slots.append(slots)
        out_slots.append(slots[prefix:])
        positions.append(torch.arange(prefix, prefix + n))
    return ForwardBatch(
        input_ids=torch.zeros(sum(n for _, n in segments), dtype=torch.int64),
        positions=torch.cat(positions),
        out_slots=torch.cat(out_slots),
        prefix_lens=[p for p, _ in segments],
        extend_lens=[n for _, n in segments],
        kv_slots=kv_slots,
    )


def filled_pool(batch: ForwardBatch, num_kv_heads: int, seed: int = 1) -> KVSlotPool:
    """A one-layer pool whose cached prefixes hold random K/V."""
    pool = KVSlotPool(sum(len(s) for s in batch.kv_slots) + 1, 1, num_kv_heads, HEAD_DIM)
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=torch.Generator().manual_seed(seed)))
    return pool


def plain_attention(q, k, v, batch: ForwardBatch, pool: KVSlotPool, scaling: float, window: int | None) -> torch.Tensor:
    """Written out per sequence: softmax over the visible keys (transformers' rule), K/V heads repeated."""
    k_cache, v_cache = pool.k(0).clone(), pool.v(0).clone()
    k_cache[batch.out_slots], v_cache[batch.out_slots] = k, v
    group = q.shape[1] // k.shape[1]
    outs, row = [], 0
    for prefix, n, slots in zip(batch.prefix_lens, batch.extend_lens, batch.kv_slots):
        keys = k_cache[slots].repeat_interleave(group, 1)  # [N, heads, d]
        values = v_cache[slots].repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q[row : row + n], keys) * scaling
        query_pos = torch.arange(prefix, prefix + n)[:, None]
        key_pos = torch.arange(len(slots))[None, :]
        visible = key_pos <= query_pos
        if window is not None:
            visible &= key_pos > query_pos - window
        weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        outs.append(torch.einsum("hqk,khd->qhd", weights, values).reshape(n, -1))
        row += n
    return torch.cat(outs)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (8, 2), (9, 3)])
@pytest.mark.parametrize("window", [None, 7, 100])
@pytest.mark.slow
def test_blocked_prefill_equals_padded_path_and_plain_softmax(monkeypatch, num_heads, num_kv_heads, window):
    batch = ragged_batch(SEGMENTS)
    meta = AttentionMetadata.from_batch(batch)
    assert any(g.max_extend > 1 and g.padded_rows is not None for g in meta.groups)  # the padded path pads
    assert any(g.max_extend > 1 and not g.fresh for g in meta.groups)  # and reads prefixes from the pool
    gen = torch.Generator().manual_seed(2)
    tokens = batch.input_ids.numel()
    q = torch.randn(tokens, num_heads, HEAD_DIM, generator=gen)
    k = torch.randn(tokens, num_kv_heads, HEAD_DIM, generator=gen)
    v = torch.randn(tokens, num_kv_heads, HEAD_DIM, generator=gen)
    scaling = HEAD_DIM**-0.5

    pool = filled_pool(batch, num_kv_heads)
    blocked = paged_attention(q, k, v, pool, 0, meta, scaling, window)
    monkeypatch.setattr(attention, "BLOCKED_EXTEND_DEVICES", frozenset())
    padded_pool = filled_pool(batch, num_kv_heads)
    padded = paged_attention(q, k, v, padded_pool, 0, AttentionMetadata.from_batch(batch), scaling, window)

    torch.testing.assert_close(blocked, padded, atol=2e-6, rtol=0)
    torch.testing.assert_close(blocked, plain_attention(q, k, v, batch, filled_pool(batch, num_kv_heads), scaling, window),
                               atol=2e-6, rtol=0)
    assert torch.equal(pool.kv, padded_pool.kv)  # both wrote the new K/V to the same slots


def test_query_blocks_read_only_visible_keys():
    prefix, extend = 512, 512
    blocks = query_blocks(prefix, extend, group_size=3)
    assert [(b.start, b.end) for b in blocks] == [(s, min(s + QUERY_BLOCK, extend)) for s in range(0, extend, QUERY_BLOCK)]
    for b in blocks:
        assert b.key_start == 0 and b.key_end == prefix + b.end  # nothing past the block's last query
        assert b.mask.shape == (1, 1, 3 * (b.end - b.start), b.key_end)
    scored = sum((b.end - b.start) * (b.key_end - b.key_start) for b in blocks)
    causal = extend * prefix + extend * (extend + 1) // 2
    assert scored == causal + extend * (QUERY_BLOCK - 1) // 2  # within half a block a row of the triangle
    assert scored < 0.8 * extend * (prefix + extend)  # what one masked call over all keys scores

    window = 100
    for b in query_blocks(prefix, extend, sliding_window=window):
        assert b.key_start == max(0, prefix + b.start - window + 1)  # keys before the window are skipped
        assert b.key_end - b.key_start == window + (b.end - b.start) - 1


def test_cpu_prefill_never_expands_kv_heads_nor_reads_keys_past_a_block(monkeypatch):
    num_heads, num_kv_heads, prefix, extend = 8, 2, 200, 150
    batch = ragged_batch([(prefix, extend)])
    tokens = batch.input_ids.numel()
    calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(query, key, value, *args, **kwargs):
        calls.append((tuple(query.shape), tuple(key.shape)))
        return sdpa(query, key, value, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(tokens, num_heads, HEAD_DIM, generator=gen)
    k, v = (torch.randn(tokens, num_kv_heads, HEAD_DIM, generator=gen) for _ in range(2))
    paged_attention(q, k, v, filled_pool(batch, num_kv_heads), 0, AttentionMetadata.from_batch(batch), 0.25)

    assert len(calls) == math.ceil(extend / QUERY_BLOCK)
    assert all(key[1] == num_kv_heads for _, key in calls)  # GQA folded into queries, K/V not repeated
    assert [key[2] for _, key in calls] == [prefix + min(s + QUERY_BLOCK, extend) for s in range(0, extend, QUERY_BLOCK)]
