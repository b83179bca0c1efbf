"""A C++ decode-attention kernel for CPUs that reads the KV pool in place (no gather into a copy).

A decode step attends each sequence's one new query (all query heads of a KV head together) to
its cached keys. Written with torch operators, that is a gather of every cached key and value
row into a padded copy, a transpose into another copy, two small batched matmuls and a softmax
between them, many times the cost of reading those rows once, and it grows with every context.
``paged_decode_attention.cpp`` walks each sequence's pool rows through its slot list instead,
scores the query heads of a KV head against each key row while it is in registers, prefetches rows
ahead of use (slots are scattered) and reads each value row once (float32 softmax and
accumulation).

The kernel is part of sglite's C++ library (:mod:`~sglite.runtime.kernels.library`, built on first use),
which registers it as the CPU kernel of the op ``sglite::paged_decode_attention`` (schema and fake kernel
defined below), so a ``torch.compile``'d decode step calls it, and every call goes from the dispatcher
straight into C++, with no Python in between. Where the library is not built the models keep their torch formulation.

    >>> if native_kernels.load():                                            # doctest: +SKIP
    ...     out = paged_decode_attention(q, k, v, k_cache, v_cache, kv_index, kv_lens, 0.125)
"""

from __future__ import annotations

import torch

from sglite.runtime.kernels import ops  # noqa: F401 - the op schemas this wrapper calls


def paged_decode_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_index: torch.Tensor,
    kv_lens: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Attention of one new token per sequence over its cached keys and itself, on a CPU.

    ``q`` ``[B, heads, d]``; ``k_new``/``v_new`` ``[B, kv_heads, d]`` (the new token's, after RoPE);
    ``k_cache``/``v_cache`` ``[slots, kv_heads, d]`` (contiguous, read only); ``kv_index`` ``[B, S]``
    int64 pool slots of each sequence's cached keys, of which the first ``kv_lens[b]`` are real.
    Returns ``[B, heads * d]`` in ``q``'s dtype. Call :func:`sglite.runtime.kernels.library.load` first:
    the op ``sglite::paged_decode_attention`` has its CPU kernel (C++, called by the dispatcher without
    Python, inside compiled graphs too) once the library is loaded.
    """
    return torch.ops.sglite.paged_decode_attention(q, k_new, v_new, k_cache, v_cache, kv_index, kv_lens, scaling)
