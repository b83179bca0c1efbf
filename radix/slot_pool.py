"""Who owns the free KV slots: a fixed range of slot indices, handed out and taken back."""

from __future__ import annotations

import torch


class SlotAllocator:
    """The free slots among ``range(size)``.

    The allocator owns the free slots; whoever ``alloc``s slots owns them until it ``free``s them
    or hands them to the radix cache (which then owns them). It holds indices only: the KV tensors
    the slots index live in the runtime (``sglite.runtime.kv_pool.KVSlotPool`` extends this class).

        >>> slots = SlotAllocator(16)
        >>> taken = slots.alloc(3); slots.num_free
        13
        >>> slots.free(taken); slots.num_free
        16
    """

    def __init__(self, size: int, device: str | torch.device = "cpu") -> None:
        if size <= 0:
            raise ValueError(f"KV pool size must be positive, got {size}")
        self.size = size
        self.device = torch.device(device)
        self.reset()

    @property
    def num_free(self) -> int:
        return self._num_free

    def alloc(self, n: int) -> torch.Tensor | None:
        """Take ``n`` free slots (int64 tensor), or ``None`` when fewer than ``n`` are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} slots")
        if n > self._num_free:
            return None
        if n > self._free.numel():  # merge the freed chunks only when the head runs short
            self._free = torch.cat([self._free, *self._returned])
            self._returned.clear()
        slots, self._free = self._free[:n], self._free[n:]
        self._num_free -= n
        return slots.clone()

    def free(self, slots: torch.Tensor) -> None:
        """Give ``slots`` back. Freeing a slot twice corrupts the pool; callers keep ownership exact.

        O(1): the chunk is queued, not concatenated onto the whole free list (``alloc`` merges lazily).
        """
        if slots.numel():
            self._returned.append(slots.to(self.device, torch.int64))
            self._num_free += int(slots.numel())

    def reset(self) -> None:
        """Every slot free again."""
        self._free = torch.arange(self.size, dtype=torch.int64, device=self.device)
        self._returned: list[torch.Tensor] = []
        self._num_free = self.size
