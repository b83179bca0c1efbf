"""One block of memory for a model's packed weights (or the KV pool), in transparent huge pages where Linux
offers them.

Decode streams every weight from memory once a step, and attention reads every cached key and value.
In 4 KiB pages SmolLM2-135M's 257 MB of bfloat16 weights span ~63,000 pages, and the CPU's hardware
prefetchers stop at each page boundary; 2 MiB pages let them run on.
Linux hands out huge pages to memory advised with ``MADV_HUGEPAGE`` when
``/sys/kernel/mm/transparent_hugepage/enabled`` is ``madvise`` (the usual default) or ``always``;
torch's allocator asks only under the process-wide ``THP_MEM_ALLOC_ENABLE``, so the arena maps its
own anonymous memory and advises just that. Where the advice is refused (another OS, ``never``) it is
ordinary memory and everything works the same.

    >>> arena = HugePageArena(3 * 2**20)
    >>> t = arena.take((256, 64), torch.bfloat16)
    >>> t.shape, t.data_ptr() % 64 == 0
    (torch.Size([256, 64]), True)
"""

from __future__ import annotations

import mmap

import torch

HUGE_PAGE = 2 * 2**20
ALIGNMENT = 4096  # each tensor on its own page boundary (cache lines and vector loads aligned)


def _aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to :data:`ALIGNMENT`: the room one tensor takes in the arena."""
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


class HugePageArena:
    """``take`` carves tensors out of one private anonymous mapping advised for huge pages.

    The memory starts zeroed (the KV pool relies on it). The tensors keep the mapping alive (they view it
    through :func:`torch.frombuffer`); it is unmapped when the last of them goes. ``huge_pages_advised``
    says whether the advice was accepted."""

    def __init__(self, nbytes: int) -> None:
        self.huge_pages_advised = False
        if hasattr(mmap, "MAP_PRIVATE"):
            mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            advice = getattr(mmap, "MADV_HUGEPAGE", None)
            if advice is not None:
                try:
                    mapping.madvise(advice)
                    self.huge_pages_advised = True
                except OSError:  # a kernel without transparent huge pages
                    pass
            self._bytes = torch.frombuffer(mapping, dtype=torch.uint8)
        else:  # no anonymous private mappings (Windows): torch's own memory, zeroed as a fresh mapping is
            self._bytes = torch.zeros(nbytes + HUGE_PAGE, dtype=torch.uint8)
        self._offset = -self._bytes.data_ptr() % HUGE_PAGE  # start on a huge page boundary
        self._end = self._offset + nbytes

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A new tensor of ``shape`` and ``dtype`` in the arena, as yet unwritten (zero); ``MemoryError`` when full."""
        nbytes = dtype.itemsize * int(torch.Size(shape).numel())
        start = self._offset
        if start + nbytes > self._end:
            raise MemoryError(f"the arena has {self._end - start} bytes left, {nbytes} asked")
        self._offset = start + _aligned(nbytes)
        return self._bytes[start : start + nbytes].view(dtype).view(shape)

    @staticmethod
    def bytes_for(sizes: list[int]) -> int:
        """Arena bytes that hold tensors of these byte sizes, each aligned as :meth:`take` aligns it."""
        return sum(_aligned(size) for size in sizes)
