"""The KV cache the models write: one slot holds one token's keys and values in every layer."""

from __future__ import annotations

import math

import torch

from sglite.radix.slot_pool import SlotAllocator
from sglite.runtime.kernels.huge_page_arena import HugePageArena


class KVSlotPool(SlotAllocator):
    """``kv[layer, 0|1, slot]`` holds the keys (0) and values (1) of one token.

    Slot ownership (alloc / free) is the :class:`~sglite.radix.slot_pool.SlotAllocator`'s; this
    class adds the tensors that the attention layers read and write through ``k`` / ``v``.

        >>> pool = KVSlotPool(16, num_layers=2, num_kv_heads=2, head_dim=8)
        >>> tuple(pool.k(0).shape), pool.num_free
        ((16, 2, 8), 16)
        >>> slots = pool.alloc(3); pool.num_free
        13
    """

    def __init__(
        self,
        size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(size, device)
        shape = (num_layers, 2, size, num_kv_heads, head_dim)
        if self.device.type == "cpu":
            # in huge pages, like the weights: decode reads every cached row of every layer each step
            # (anonymous memory starts zeroed, as torch.zeros would)
            self.kv = HugePageArena(HugePageArena.bytes_for([dtype.itemsize * math.prod(shape)])).take(shape, dtype)
        else:
            self.kv = torch.zeros(shape, dtype=dtype, device=self.device)

    def k(self, layer: int) -> torch.Tensor:
        """Keys of ``layer``: ``[slots, kv_heads, head_dim]`` (a view; writes land in the pool)."""
        return self.kv[layer, 0]

    def v(self, layer: int) -> torch.Tensor:
        """Values of ``layer``: ``[slots, kv_heads, head_dim]`` (a view; writes land in the pool)."""
        return self.kv[layer, 1]
