"""Ragged paged attention over the KV slot pool, with torch's scaled_dot_product_attention.

A ragged batch (sequence ``i``: ``prefix_lens[i]`` cached tokens + ``extend_lens[i]`` new ones)
mixes decode steps (one new token) with prefill chunks (hundreds), over contexts of a few tokens
to thousands. Padded as one problem, every row would pay for the longest chunk and the longest
context (31 decodes + a 512-token chunk = 32 x 512 query rows; a 100-token request decoding next
to a 1100-token one would read 1100 keys per layer). So the batch is split once per forward into
groups whose extend lengths *and* key counts share power-of-two buckets (decode steps group
apart from chunks; short contexts apart from long ones), and each group is padded on its own:
under 2x padding of queries and keys, so a request's attention costs in proportion to its own
context. Every layer reuses that layout.

Two cases skip work: a decode group folds the query heads of each KV head into the query axis
(no K/V expansion for GQA), and a fresh prefill (no cached prefix) attends to its own new K/V
with SDPA's causal kernel instead of reading them back from the pool through a mask. On CPU a
prefill group goes further (``prefill_attention.py``): sequence by sequence, in query blocks that
read only the keys up to their last position, so neither padding nor the masked-out half of the
causal triangle is computed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from sglite.runtime.kv_pool import KVSlotPool
from sglite.runtime.forward_batch import ForwardBatch
from sglite.runtime.kernels import library as native_kernels
from sglite.runtime.kernels import paged_decode
from sglite.runtime.models.masks import additive_mask, visible_keys
from sglite.runtime.models.prefill_attention import QueryBlock, extend_attention, query_blocks


MIN_KV_BUCKET = 128
"""Contexts up to this many keys share one group: padding them is cheaper than another kernel call."""

BLOCKED_EXTEND_DEVICES = frozenset({"cpu"})
"""Devices whose prefill chunks run sequence by sequence in query blocks (``prefill_attention.py``:
no padding, no key past a block's last query, no K/V expansion); elsewhere a group is one padded,
masked SDPA call, where one kernel launch beats a Python loop of small ones."""


@dataclass
class AttentionGroup:
    """Sequences padded together: ``B x max_extend`` queries against ``B x max_kv`` keys."""

    token_rows: torch.Tensor | None
    """``[T_g]`` rows of this group's tokens in the batch's flat token order; ``None`` when the
    group is the whole batch (in order)."""
    kv_index: torch.Tensor
    """``[B, max_kv]`` pool slots of each sequence's keys; padding points at slot 0 (masked out)."""
    query_positions: torch.Tensor
    """``[B, max_extend]`` absolute position of each padded query; padding repeats the last real one."""
    kv_lens: torch.Tensor
    """``[B]`` keys per sequence (prefix + extend)."""
    padded_rows: torch.Tensor | None
    """``[T_g]`` row of each token in the flat ``[B * max_extend]`` query layout; ``None`` when
    every sequence of the group extends by the same count and no padding is needed."""
    max_extend: int
    fresh: bool
    """Every sequence prefills from position 0, unpadded: its keys are exactly the new tokens, and
    the mask is plain causal (SDPA's ``is_causal``, which skips the masked blocks)."""
    equal_kv: bool = False
    """Decode steps over equally many keys: no key is padding, so without a sliding window no mask."""
    prefix_lens: tuple[int, ...] = ()
    """Cached tokens of each sequence, in the group's order."""
    extend_lens: tuple[int, ...] = ()
    """New tokens of each sequence; the group's query rows hold them sequence after sequence."""
    _masks: dict[tuple[int | None, torch.dtype], torch.Tensor] = field(default_factory=dict, repr=False)
    _query_blocks: dict[tuple[int | None, torch.dtype, int], list[list[QueryBlock]]] = field(
        default_factory=dict, repr=False
    )

    @property
    def batch_size(self) -> int:
        return self.kv_index.shape[0]

    @property
    def padded_kv_positions(self) -> int:
        """Keys each layer reads for this group, padding included (``B x max_kv``)."""
        return self.kv_index.numel()

    @functools.cached_property
    def cached_lens(self) -> torch.Tensor:
        """Decode groups: ``[B]`` int64 cached keys of each sequence (its keys before the one new token)."""
        return self.kv_lens - 1

    @functools.cached_property
    def new_slots(self) -> torch.Tensor:
        """Decode groups: ``[B]`` pool slot of each sequence's new token (its last key)."""
        return self.kv_index.gather(1, self.cached_lens[:, None]).squeeze(1)

    def mask(self, sliding_window: int | None = None, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """``[B, 1, max_extend, max_kv]``: where a query may attend to a key.

        Key ``k`` of sequence ``i`` is visible to query ``j`` iff ``k <= prefix_lens[i] + j``
        (causal), ``k < kv_lens[i]`` (not padding), and, with a sliding window ``w``,
        ``k > position - w`` (the same rule as transformers). Boolean (True = visible), or for a
        floating ``dtype`` additive (0 / -inf: what SDPA would convert a boolean mask to in every
        layer). Cached per window size and dtype.
        """
        if (sliding_window, dtype) not in self._masks:
            key = torch.arange(self.kv_index.shape[1], device=self.kv_index.device)[None, None, :]
            query = self.query_positions[:, :, None]
            visible = visible_keys(key, query, sliding_window) & (key < self.kv_lens[:, None, None])
            visible = visible[:, None, :, :]
            if dtype != torch.bool:
                visible = additive_mask(visible, dtype)
            self._masks[(sliding_window, dtype)] = visible
        return self._masks[(sliding_window, dtype)]

    def query_blocks(self, group_size: int, sliding_window: int | None, dtype: torch.dtype) -> list[list[QueryBlock]]:
        """Per sequence, its :func:`~sglite.runtime.models.prefill_attention.query_blocks`; built
        once per forward (per window size and dtype) and shared by the layers."""
        key = (sliding_window, dtype, group_size)
        if key not in self._query_blocks:
            device = self.kv_index.device
            self._query_blocks[key] = [
                query_blocks(prefix, n, group_size, sliding_window, dtype, device)
                for prefix, n in zip(self.prefix_lens, self.extend_lens)
            ]
        return self._query_blocks[key]


def _build_group(
    batch: ForwardBatch, seqs: list[int], token_starts: list[int], whole_batch: bool, device: torch.device
) -> AttentionGroup:
    """Lay out sequences ``seqs`` of ``batch``, whose token ``j`` of sequence ``i`` is flat row
    ``token_starts[i] + j``; ``whole_batch``: ``seqs`` is every sequence, in order."""
    extend = [batch.extend_lens[i] for i in seqs]
    max_extend = max(extend)
    extend_lens = torch.tensor(extend, dtype=torch.int64, device=device)
    prefix_lens = torch.tensor([batch.prefix_lens[i] for i in seqs], dtype=torch.int64, device=device)
    kv_lens = prefix_lens + extend_lens
    # Slot 0 always exists in the pool, so padded keys gather something harmless; the mask hides it.
    kv_index = pad_sequence([batch.kv_slots[i].to(device) for i in seqs], batch_first=True, padding_value=0)
    offsets = torch.arange(max_extend, dtype=torch.int64, device=device)
    # Padded queries copy the last real query's position, so no mask row is ever empty (no NaNs).
    query_positions = torch.minimum(prefix_lens[:, None] + offsets[None, :], (kv_lens - 1)[:, None])

    padded_rows = token_rows = None
    if max_extend == 1:
        if not whole_batch:
            token_rows = torch.tensor([token_starts[i] for i in seqs], dtype=torch.int64, device=device)
    else:
        seq_of_token = torch.repeat_interleave(torch.arange(len(seqs), device=device), extend_lens)
        first_token = torch.cumsum(extend_lens, 0) - extend_lens
        offset_in_seq = torch.arange(seq_of_token.numel(), device=device) - first_token[seq_of_token]
        if any(n != max_extend for n in extend):
            padded_rows = seq_of_token * max_extend + offset_in_seq
        if not whole_batch:
            starts = torch.tensor([token_starts[i] for i in seqs], dtype=torch.int64, device=device)
            token_rows = starts[seq_of_token] + offset_in_seq
    fresh = max_extend > 1 and padded_rows is None and not any(batch.prefix_lens[i] for i in seqs)
    equal_kv = max_extend == 1 and len({batch.prefix_lens[i] for i in seqs}) == 1
    return AttentionGroup(
        token_rows, kv_index, query_positions, kv_lens, padded_rows, max_extend, fresh, equal_kv,
        prefix_lens=tuple(batch.prefix_lens[i] for i in seqs), extend_lens=tuple(extend),
    )


@dataclass
class AttentionMetadata:
    """The grouped, padded layout of one :class:`ForwardBatch`, built once and shared by all layers.

        >>> meta = AttentionMetadata.from_batch(batch)          # doctest: +SKIP
        >>> [g.max_extend for g in meta.groups]   # 31 decodes + a 512-token chunk: [1, 512]  # doctest: +SKIP
        >>> out = paged_attention(q, k, v, pool, layer_id, meta, scaling=0.125)  # doctest: +SKIP
    """

    out_slots: torch.Tensor
    """``[T]`` pool slot receiving each new token's K/V."""
    groups: list[AttentionGroup]
    """Disjoint groups covering every sequence; within one, extend lengths are within 2x, and so
    are key counts (or all at most ``MIN_KV_BUCKET``)."""

    @property
    def padded_kv_positions(self) -> int:
        """Keys every layer reads, padding included, summed over the groups."""
        return sum(g.padded_kv_positions for g in self.groups)

    @classmethod
    def from_batch(cls, batch: ForwardBatch, device: torch.device | str | None = None) -> AttentionMetadata:
        """Bucket the sequences by extend length and key count, then lay out each bucket (tensors only past that).

            >>> import torch
            >>> contexts = [40, 50, 1000, 60]   # decode steps; the third request has a long context
            >>> batch = ForwardBatch(
            ...     input_ids=torch.zeros(4, dtype=torch.int64), positions=torch.tensor(contexts),
            ...     out_slots=torch.tensor(contexts), prefix_lens=contexts, extend_lens=[1] * 4,
            ...     kv_slots=[torch.arange(n + 1) for n in contexts])
            >>> meta = AttentionMetadata.from_batch(batch)
            >>> [tuple(g.kv_index.shape) for g in meta.groups]   # short rows do not pad to 1001 keys
            [(3, 61), (1, 1001)]
        """
        device = torch.device(device) if device is not None else batch.input_ids.device
        buckets: dict[tuple[int, int], list[int]] = {}
        token_starts, start = [], 0
        for i, (prefix, n) in enumerate(zip(batch.prefix_lens, batch.extend_lens)):
            # (n - 1).bit_length(): 1 -> 0, 2 -> 1, 3..4 -> 2, 5..8 -> 3, ...: under 2x padding per bucket
            kv_bucket = (max(prefix + n, MIN_KV_BUCKET) - 1).bit_length()
            buckets.setdefault(((n - 1).bit_length(), kv_bucket), []).append(i)
            token_starts.append(start)
            start += n
        whole = len(buckets) == 1
        groups = [_build_group(batch, seqs, token_starts, whole, device) for _, seqs in sorted(buckets.items())]
        return cls(out_slots=batch.out_slots.to(device), groups=groups)


def _decode_attention_matmul(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Batched decode attention as two batched matmuls with a float32 softmax.

    On CPU, SDPA's flash kernel tiles for long query blocks; with 1-3 query rows per KV head and a
    batch of sequences it runs slower than plain matmuls (docs/performance.md).
    ``mask`` is additive float32 ``[B, 1, 1, max_kv]``.
    """
    scores = torch.matmul(queries, keys.transpose(-1, -2)).float().mul_(scaling).add_(mask)
    return torch.matmul(scores.softmax(-1).to(values.dtype), values)


def _attend_group(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    group: AttentionGroup,
    scaling: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Attention of one group's new tokens (``q``/``k``/``v`` rows ``[T_g, heads | kv_heads, head_dim]``);
    returns ``[T_g, heads * head_dim]``."""
    if group.max_extend > 1 and q.device.type in BLOCKED_EXTEND_DEVICES:
        return _attend_extend_blocked(q, k, v, k_cache, v_cache, group, scaling, sliding_window)
    if group.max_extend == 1 and q.device.type == "cpu" and native_kernels.is_loaded():
        if sliding_window is None or max(group.prefix_lens) < sliding_window:  # the kernel has no window
            # the new tokens' K/V are in the pool already; the kernel takes them as each row's last key
            k_new, v_new = k_cache.index_select(0, group.new_slots), v_cache.index_select(0, group.new_slots)
            return paged_decode.paged_decode_attention(
                q, k_new, v_new, k_cache, v_cache, group.kv_index, group.cached_lens, scaling
            )
    num_heads, head_dim = q.shape[1], q.shape[2]
    batch_size, max_extend = group.batch_size, group.max_extend
    layout = (batch_size, group.kv_index.shape[1], k_cache.shape[1], head_dim)
    if group.fresh:
        keys, values = k.view(layout), v.view(layout)  # no cached prefix: skip the pool round trip
    else:
        # index_select on the flat index: several times faster on CPU than k_cache[kv_index] (2-D indexing)
        flat_index = group.kv_index.view(-1)
        keys = k_cache.index_select(0, flat_index).view(layout)
        values = v_cache.index_select(0, flat_index).view(layout)
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # [B, kv_heads, max_kv, d]
    num_kv_heads = keys.shape[1]
    causal = group.fresh and sliding_window is None

    if max_extend == 1:
        # Decode: the query heads sharing a KV head take the query-length axis, so K/V are not
        # expanded and the [B, 1, 1, max_kv] mask broadcasts (GQA without enable_gqa's fallbacks).
        queries = q.view(batch_size, num_kv_heads, num_heads // num_kv_heads, head_dim)
        if batch_size > 1 and q.device.type == "cpu":
            out = _decode_attention_matmul(queries, keys, values, group.mask(sliding_window, torch.float32), scaling)
        else:
            mask = None if group.equal_kv and sliding_window is None else group.mask(sliding_window, q.dtype)
            out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scaling)
        return out.reshape(batch_size, num_heads * head_dim)

    mask = None if causal else group.mask(sliding_window, q.dtype)

    group_size = num_heads // num_kv_heads
    if group_size > 1:
        # Explicit head expansion rather than `enable_gqa`: with a mask, GQA in SDPA falls back to
        # the math kernel on CUDA, while expanded K/V keep the memory-efficient kernel.
        keys = keys.repeat_interleave(group_size, dim=1)
        values = values.repeat_interleave(group_size, dim=1)
    if group.padded_rows is None:
        queries = q.view(batch_size, max_extend, num_heads, head_dim)
    else:
        queries = q.new_zeros(batch_size * max_extend, num_heads, head_dim)
        queries[group.padded_rows] = q
        queries = queries.view(batch_size, max_extend, num_heads, head_dim)
    out = F.scaled_dot_product_attention(
        queries.transpose(1, 2), keys, values, attn_mask=mask, is_causal=causal, scale=scaling
    )  # [B, heads, max_extend, d]
    out = out.transpose(1, 2).reshape(batch_size * max_extend, num_heads * head_dim)
    return out if group.padded_rows is None else out.index_select(0, group.padded_rows)


def _attend_extend_blocked(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    group: AttentionGroup,
    scaling: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """A prefill group, one sequence at a time (:func:`extend_attention`): a sequence without a
    cached prefix reads its new ``k``/``v`` rows (when given), one with a prefix gathers its keys
    from the pool."""
    blocks = group.query_blocks(q.shape[1] // k_cache.shape[1], sliding_window, q.dtype)
    outs, row = [], 0
    for i, (prefix, n) in enumerate(zip(group.prefix_lens, group.extend_lens)):
        if prefix == 0 and k is not None:
            keys, values = k[row : row + n], v[row : row + n]
        else:
            slots = group.kv_index[i, : prefix + n]
            keys, values = k_cache.index_select(0, slots), v_cache.index_select(0, slots)
        outs.append(extend_attention(q[row : row + n], keys, values, blocks[i], scaling))
        row += n
    return outs[0] if len(outs) == 1 else torch.cat(outs)


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
    k_cache, v_cache = pool.k(layer_id), pool.v(layer_id)
    k_cache.index_copy_(0, meta.out_slots, k)  # in place in the pool (index_copy_: no index_put overhead)
    v_cache.index_copy_(0, meta.out_slots, v)
    if len(meta.groups) == 1:
        return _attend_group(q, k, v, k_cache, v_cache, meta.groups[0], scaling, sliding_window)
    out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
    for group in meta.groups:
        rows = group.token_rows
        if group.fresh:
            k_rows, v_rows = k.index_select(0, rows), v.index_select(0, rows)
        else:
            k_rows = v_rows = None  # read from the pool
        out.index_copy_(
            0, rows, _attend_group(q.index_select(0, rows), k_rows, v_rows, k_cache, v_cache, group, scaling, sliding_window)
        )
    return out
