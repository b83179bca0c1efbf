"""Decode attention that only reads the KV pool: the shape a captured (compiled) decode step needs.

The eager path (:func:`~sglite.runtime.models.attention.paged_attention`) writes each new token's
K/V into the pool and then reads it back with the cached ones. A captured graph should not mutate
its inputs, so here the new token's key and value are attended to *beside* the cached ones: the
scores of the cached keys (one batched matmul over the gathered pool rows) and the token's own
score are concatenated before the softmax, and the caller stores the new K/V after the step. The
arithmetic is the same attention; only the write moves.

Every sequence's cached keys are padded to the batch's longest context (``kv_index`` rows point
at slot 0 past a sequence's end, ``kv_mask`` hides them), so the caller should group sequences
whose contexts are alike (:class:`~sglite.runtime.compiled_decode.CompiledDecode` does).
Sliding windows are not applied: use this only where every context fits in the layer's window.
On a CPU where the C++ kernel of :mod:`~sglite.runtime.kernels.paged_decode` is loaded, the pool
rows are read in place through ``kv_index`` instead of being gathered (same arithmetic, float32
softmax); elsewhere the torch formulation below runs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sglite.runtime.kernels import library as native_kernels
from sglite.runtime.kernels import paged_decode
from sglite.runtime.models.masks import additive_mask


class DecodeContext(NamedTuple):
    """Where each decoding sequence's cached keys sit in the pool."""

    kv_index: torch.Tensor
    """``[B, S]`` int64 pool slots of each sequence's cached tokens (not the new one), padded with slot 0."""
    kv_mask: torch.Tensor
    """``[B, S]`` float32, 0 where ``kv_index`` is a real key and -inf where it is padding."""
    kv_lens: torch.Tensor
    """``[B]`` int64 cached keys of each sequence (the real prefix of its ``kv_index`` row)."""

    @classmethod
    def from_slots(cls, cached_slots: list[torch.Tensor], multiple: int = 16) -> DecodeContext:
        """Pad ``cached_slots`` (one int64 tensor per sequence) to one width, a multiple of ``multiple``.

            >>> ctx = DecodeContext.from_slots([torch.tensor([4, 5, 6]), torch.tensor([9])], multiple=4)
            >>> ctx.kv_index.tolist()
            [[4, 5, 6, 0], [9, 0, 0, 0]]
            >>> ctx.kv_mask[1].tolist()
            [0.0, -inf, -inf, -inf]
        """
        lengths = [len(s) for s in cached_slots]
        width = -(-max(max(lengths), 1) // multiple) * multiple
        kv_index = torch.zeros(len(cached_slots), width, dtype=torch.int64)
        for row, slots in zip(kv_index, cached_slots):
            row[: len(slots)] = slots
        visible = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
        kv_mask = additive_mask(visible, torch.float32)
        return cls(kv_index, kv_mask, torch.tensor(lengths, dtype=torch.int64))

    def to(self, device: torch.device) -> DecodeContext:
        return DecodeContext(*(t.to(device, non_blocking=True) for t in self))


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cached: DecodeContext,
    scaling: float,
) -> torch.Tensor:
    """Attention of one new token per sequence over its cached keys and itself.

    ``q`` ``[B, heads, d]``; ``k``/``v`` ``[B, kv_heads, d]`` (the new token's, after RoPE);
    ``k_cache``/``v_cache`` ``[slots, kv_heads, d]`` (read only). Returns ``[B, heads * d]``.
    The query heads sharing a KV head take the query axis (GQA without expanding K/V); scores and
    softmax are float32.

        >>> B, H, KVH, D, S = 2, 4, 2, 8, 5
        >>> k_cache, v_cache = torch.randn(16, KVH, D), torch.randn(16, KVH, D)
        >>> q, k, v = torch.randn(B, H, D), torch.randn(B, KVH, D), torch.randn(B, KVH, D)
        >>> ctx = DecodeContext.from_slots([torch.arange(5), torch.arange(8, 10)])
        >>> out = decode_attention(q, k, v, k_cache, v_cache, ctx, D**-0.5)
        >>> keys = torch.cat((k_cache[8:10], k[1:2]))                  # the second sequence by hand
        >>> vals = torch.cat((v_cache[8:10], v[1:2]))
        >>> kh = keys.repeat_interleave(2, 1).transpose(0, 1)           # [H, 3, D]
        >>> ref = torch.softmax(q[1][:, None] @ kh.transpose(1, 2) * D**-0.5, -1) @ vals.repeat_interleave(2, 1).transpose(0, 1)
        >>> torch.allclose(out[1], ref.reshape(-1), atol=1e-5)
        True
    """
    if q.device.type == "cpu" and native_kernels.is_loaded():
        return paged_decode.paged_decode_attention(q, k, v, k_cache, v_cache, cached.kv_index, cached.kv_lens, scaling)
    return decode_attention_gathered(q, k, v, k_cache, v_cache, cached, scaling)


def decode_attention_gathered(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cached: DecodeContext,
    scaling: float,
) -> torch.Tensor:
    """:func:`decode_attention` in torch operators: the cached rows gathered into a padded copy."""
    batch_size, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    width = cached.kv_index.shape[1]
    layout = (batch_size, width, num_kv_heads, head_dim)
    flat = cached.kv_index.reshape(-1)
    keys = k_cache.index_select(0, flat).view(layout).transpose(1, 2)  # [B, kv_heads, S, d]
    values = v_cache.index_select(0, flat).view(layout).transpose(1, 2)
    queries = q.view(batch_size, num_kv_heads, num_heads // num_kv_heads, head_dim)
    cached_scores = torch.matmul(queries, keys.transpose(-1, -2)).float() * scaling + cached.kv_mask[:, None, None, :]
    own_scores = (queries.float() * k.float()[:, :, None, :]).sum(-1, keepdim=True) * scaling
    probs = torch.cat((cached_scores, own_scores), dim=-1).softmax(-1).to(values.dtype)
    out = torch.matmul(probs[..., :width], values) + probs[..., width:] * v[:, :, None, :]
    return out.reshape(batch_size, num_heads * head_dim)
