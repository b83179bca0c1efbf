"""Prefill attention on CPU: one sequence's new tokens over its ``[cached prefix ; new tokens]``,
cut into query blocks that each read only the keys they may see.

torch's CPU flash kernel tiles keys in blocks of 512 and computes every tile it touches in full:
with ``is_causal`` a 512-token chunk costs as much as without, and a chunk over a cached prefix,
as one masked call, scores all ``prefix + extend`` keys for every query. Here the queries go in
blocks of :data:`QUERY_BLOCK` tokens, block ``[s, e)`` over keys ``[0, prefix + e)`` only (from
``prefix + s - window + 1`` with a sliding window), so the causal triangle is computed to within
``QUERY_BLOCK / 2`` keys a row, whatever the chunk size.

The query heads that share a KV head are folded into the query axis (``[kv_heads, tokens x
group, head_dim]``), so K/V are read as views of the gathered keys, never expanded for GQA, and a
block's mask broadcasts over the KV heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sglite.runtime.models.masks import additive_mask, visible_keys

QUERY_BLOCK = 64
"""New tokens per query block: smaller blocks skip more keys, larger ones make fewer, more efficient kernel
calls; 64 measured fastest (docs/performance.md)."""


@dataclass(frozen=True)
class QueryBlock:
    """Queries ``[start, end)`` of a sequence's new tokens attend to its keys ``[key_start, key_end)``."""

    start: int
    end: int
    key_start: int
    key_end: int
    mask: torch.Tensor | None
    """Additive ``[1, 1, (end - start) x group, key_end - key_start]`` (0 / -inf; rows in the folded
    order token-major, head-minor), or None where every query sees every key of the block. A
    forward keeps its blocks' masks for all layers: about ``group x extend x (prefix + extend / 2)``
    elements a sequence (6 MB for a 512-token chunk after 1024 tokens, SmolLM2, float32)."""


def query_blocks(
    prefix_len: int,
    extend_len: int,
    group_size: int = 1,
    sliding_window: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    block: int = QUERY_BLOCK,
) -> list[QueryBlock]:
    """The query blocks of ``extend_len`` new tokens after ``prefix_len`` cached ones.

    New token ``j`` (position ``prefix_len + j``) sees key ``k`` iff ``k <= prefix_len + j`` and,
    with a window ``w``, ``k > prefix_len + j - w`` (transformers' rule). ``group_size`` query heads
    share a KV head.

        >>> blocks = query_blocks(prefix_len=100, extend_len=150, block=64)
        >>> [(b.start, b.end, b.key_start, b.key_end) for b in blocks]
        [(0, 64, 0, 164), (64, 128, 0, 228), (128, 150, 0, 250)]
        >>> sum((b.end - b.start) * (b.key_end - b.key_start) for b in blocks) < 150 * 250
        True
        >>> [(b.key_start, b.key_end) for b in query_blocks(100, 150, sliding_window=32, block=64)]
        [(69, 164), (133, 228), (197, 250)]
    """
    blocks = []
    for start in range(0, extend_len, block):
        end = min(start + block, extend_len)
        first_query, last_query = prefix_len + start, prefix_len + end - 1
        key_start = 0 if sliding_window is None else max(0, first_query - sliding_window + 1)
        key_end = last_query + 1
        keys = torch.arange(key_start, key_end, device=device)[None, :]
        queries = torch.arange(first_query, last_query + 1, device=device)[:, None]
        visible = visible_keys(keys, queries, sliding_window)
        mask = None
        if not bool(visible.all()):
            mask = additive_mask(visible, dtype).repeat_interleave(group_size, dim=0)[None, None]
        blocks.append(QueryBlock(start, end, key_start, key_end, mask))
    return blocks


def extend_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, blocks: list[QueryBlock], scaling: float
) -> torch.Tensor:
    """Attention of one sequence's new tokens: ``q`` ``[E, heads, d]`` over ``keys``/``values``
    ``[prefix + E, kv_heads, d]`` (all of its keys, in position order), by ``blocks``
    (:func:`query_blocks` for ``group_size = heads // kv_heads``). Returns ``[E, heads * d]``.

        >>> gen = torch.Generator().manual_seed(0)
        >>> q, k, v = (torch.randn(*shape, generator=gen) for shape in [(5, 4, 8), (7, 2, 8), (7, 2, 8)])
        >>> out = extend_attention(q, k, v, query_blocks(2, 5, group_size=2, block=2), scaling=8**-0.5)
        >>> mask = torch.arange(7)[None, :] <= torch.arange(2, 7)[:, None]   # causal over the prefix too
        >>> ref = F.scaled_dot_product_attention(q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1),
        ...                                      v.repeat_interleave(2, 1).transpose(0, 1), attn_mask=mask)
        >>> torch.allclose(out, ref.transpose(0, 1).reshape(5, 32), atol=1e-6)
        True
    """
    extend_len, num_heads, head_dim = q.shape
    num_kv_heads = keys.shape[1]
    group = num_heads // num_kv_heads
    # [kv_heads, E, group, d]: one copy, after which each block's folded queries are a view
    folded = q.view(extend_len, num_kv_heads, group, head_dim).transpose(0, 1).contiguous()
    keys, values = keys.transpose(0, 1)[None], values.transpose(0, 1)[None]  # [1, kv_heads, N, d] views
    out = q.new_empty(num_kv_heads, extend_len, group, head_dim)
    for b in blocks:
        rows = b.end - b.start
        queries = folded[:, b.start : b.end].reshape(1, num_kv_heads, rows * group, head_dim)
        attended = F.scaled_dot_product_attention(
            queries,
            keys[:, :, b.key_start : b.key_end],
            values[:, :, b.key_start : b.key_end],
            attn_mask=b.mask,
            scale=scaling,
        )
        out[:, b.start : b.end] = attended.view(num_kv_heads, rows, group, head_dim)
    return out.transpose(0, 1).reshape(extend_len, num_heads * head_dim)
