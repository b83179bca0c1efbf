"""Ragged paged attention over the KV slot pool, with torch's scaled_dot_product_attention.

A ragged batch (sequence ``i``: ``prefix_lens[i]`` cached tokens + ``extend_lens[i]`` new ones)
is laid out once per forward as a padded problem — ``B x max_extend`` queries against
``B x max_kv`` keys gathered from the pool — and every layer reuses that layout. Prefill,
chunked prefill, prefix reuse and decode (all ``extend_lens == 1``) are the same code path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from sglite.radix.slot_pool import KVSlotPool
from sglite.runtime.forward_batch import ForwardBatch


@dataclass
class AttentionMetadata:
    """The padded layout of one :class:`ForwardBatch`, built once and shared by all layers.

        >>> meta = AttentionMetadata.from_batch(batch)          # doctest: +SKIP
        >>> out = paged_attention(q, k, v, pool, layer_id, meta, scaling=0.125)  # doctest: +SKIP
    """

    out_slots: torch.Tensor
    """``[T]`` pool slot receiving each new token's K/V."""
    kv_index: torch.Tensor
    """``[B, max_kv]`` pool slots of each sequence's keys; padding points at slot 0 (masked out)."""
    query_positions: torch.Tensor
    """``[B, max_extend]`` absolute position of each padded query; padding repeats the last real one."""
    kv_lens: torch.Tensor
    """``[B]`` keys per sequence (prefix + extend)."""
    padded_rows: torch.Tensor | None
    """``[T]`` row of each new token in the flat ``[B * max_extend]`` query layout; ``None`` when
    every sequence extends by the same count (decode, a single prefill) and no padding is needed."""
    max_extend: int
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return self.kv_index.shape[0]

    @classmethod
    def from_batch(cls, batch: ForwardBatch, device: torch.device | str | None = None) -> AttentionMetadata:
        """Build the layout (one pass over the sequences, then tensors only)."""
        device = torch.device(device) if device is not None else batch.input_ids.device
        extend_lens = torch.tensor(batch.extend_lens, dtype=torch.int64, device=device)
        prefix_lens = torch.tensor(batch.prefix_lens, dtype=torch.int64, device=device)
        kv_lens = prefix_lens + extend_lens
        max_extend = max(batch.extend_lens)
        # Slot 0 always exists in the pool, so padded keys gather something harmless; the mask hides it.
        kv_index = pad_sequence([s.to(device) for s in batch.kv_slots], batch_first=True, padding_value=0)
        offsets = torch.arange(max_extend, dtype=torch.int64, device=device)
        # Padded queries copy the last real query's position, so no mask row is ever empty (no NaNs).
        query_positions = torch.minimum(prefix_lens[:, None] + offsets[None, :], (kv_lens - 1)[:, None])

        padded_rows = None
        if any(n != max_extend for n in batch.extend_lens):
            seq_of_token = torch.repeat_interleave(torch.arange(len(batch.extend_lens), device=device), extend_lens)
            starts = torch.cumsum(extend_lens, 0) - extend_lens
            offset_in_seq = torch.arange(seq_of_token.numel(), device=device) - starts[seq_of_token]
            padded_rows = seq_of_token * max_extend + offset_in_seq
        return cls(
            out_slots=batch.out_slots.to(device),
            kv_index=kv_index,
            query_positions=query_positions,
            kv_lens=kv_lens,
            padded_rows=padded_rows,
            max_extend=max_extend,
        )

    def mask(self, sliding_window: int | None = None) -> torch.Tensor:
        """Boolean ``[B, 1, max_extend, max_kv]``: True where a query may attend to a key.

        Key ``k`` of sequence ``i`` is visible to query ``j`` iff ``k <= prefix_lens[i] + j``
        (causal), ``k < kv_lens[i]`` (not padding), and, with a sliding window ``w``,
        ``k > position - w`` (the same rule as transformers). Cached per window size.
        """
        if sliding_window not in self._masks:
            key = torch.arange(self.kv_index.shape[1], device=self.kv_index.device)[None, None, :]
            query = self.query_positions[:, :, None]
            visible = (key <= query) & (key < self.kv_lens[:, None, None])
            if sliding_window is not None:
                visible &= key > query - sliding_window
            self._masks[sliding_window] = visible[:, None, :, :]
        return self._masks[sliding_window]


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pool: KVSlotPool,
    layer_id: int,
    meta: AttentionMetadata,
    scaling: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Write the new tokens' ``k``/``v`` into the pool, then attend over each sequence's KV.

    ``q`` is ``[T, heads, head_dim]``; ``k``/``v`` are ``[T, kv_heads, head_dim]`` (after RoPE).
    Returns ``[T, heads * head_dim]`` in the flattened token order of the batch.
    """
    num_tokens, num_heads, head_dim = q.shape
    k_cache, v_cache = pool.k(layer_id), pool.v(layer_id)
    k_cache[meta.out_slots] = k
    v_cache[meta.out_slots] = v

    batch_size, max_extend = meta.batch_size, meta.max_extend
    keys = k_cache[meta.kv_index]  # [B, max_kv, kv_heads, d]
    values = v_cache[meta.kv_index]
    group = num_heads // keys.shape[2]
    if group > 1:
        # Explicit head expansion rather than `enable_gqa`: with a mask, GQA in SDPA falls back to
        # the math kernel on CUDA, while expanded K/V keep the memory-efficient kernel.
        keys = keys.repeat_interleave(group, dim=2)
        values = values.repeat_interleave(group, dim=2)

    if meta.padded_rows is None:
        queries = q.view(batch_size, max_extend, num_heads, head_dim)
    else:
        queries = q.new_zeros(batch_size * max_extend, num_heads, head_dim)
        queries[meta.padded_rows] = q
        queries = queries.view(batch_size, max_extend, num_heads, head_dim)

    out = F.scaled_dot_product_attention(
        queries.transpose(1, 2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=meta.mask(sliding_window),
        scale=scaling,
    )  # [B, heads, max_extend, d]
    out = out.transpose(1, 2).reshape(batch_size * max_extend, num_heads * head_dim)
    return out if meta.padded_rows is None else out[meta.padded_rows]
