"""A fixed pool of KV-cache slots: one slot holds one token's keys and values in every layer."""

from __future__ import annotations

import torch


class KVSlotPool:
    """``kv[layer, 0|1, slot]`` holds the keys (0) and values (1) of one token.

    The pool owns the free slots; whoever ``alloc``s slots owns them until it
    ``free``s them or hands them to the radix cache (which then owns them).

        >>> pool = KVSlotPool(16, num_layers=2, num_kv_heads=2, head_dim=8)
        >>> slots = pool.alloc(3); pool.num_free
        13
        >>> pool.free(slots); pool.num_free
        16
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
        if size <= 0:
            raise ValueError(f"KV pool size must be positive, got {size}")
        self.size = size
        self.device = torch.device(device)
        self.kv = torch.zeros(num_layers, 2, size, num_kv_heads, head_dim, dtype=dtype, device=self.device)
        self._free = torch.arange(size, dtype=torch.int64, device=self.device)

    @property
    def num_free(self) -> int:
        return int(self._free.numel())

    @property
    def num_used(self) -> int:
        return self.size - self.num_free

    def k(self, layer: int) -> torch.Tensor:
        """Keys of ``layer``: ``[slots, kv_heads, head_dim]`` (a view; writes land in the pool)."""
        return self.kv[layer, 0]

    def v(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 1]

    def alloc(self, n: int) -> torch.Tensor | None:
        """Take ``n`` free slots (int64 tensor), or ``None`` when fewer than ``n`` are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} slots")
        if n > self.num_free:
            return None
        slots, self._free = self._free[:n], self._free[n:]
        return slots.clone()

    def free(self, slots: torch.Tensor) -> None:
        """Give ``slots`` back. Freeing a slot twice corrupts the pool; callers keep ownership exact."""
        if slots.numel():
            self._free = torch.cat([self._free, slots.to(self.device, torch.int64)])

    def reset(self) -> None:
        self._free = torch.arange(self.size, dtype=torch.int64, device=self.device)
