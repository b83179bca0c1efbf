"""The huge-page arena for packed weights and the KV pool (``runtime/huge_page_arena.py``): aligned
tensors carved from one mapping, full is an error, the tensors keep the mapping alive, and on Linux
the mapping is advised for transparent huge pages (checked in the kernel's own account of it)."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch

from sglite.runtime.kv_pool import KVSlotPool
from sglite.runtime.kernels.huge_page_arena import HUGE_PAGE, HugePageArena

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def vm_flags(address: int) -> list[str]:
    """The VmFlags /proc/self/smaps lists for the mapping holding ``address``."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_tensors_are_aligned_views_of_one_mapping_until_it_is_full():
    arena = HugePageArena(HugePageArena.bytes_for([100, 3000, 4096]))
    a = arena.take((50,), torch.bfloat16)
    b = arena.take((750,), torch.float32)
    c = arena.take((4, 1024), torch.uint8)
    assert a.data_ptr() % HUGE_PAGE == 0  # the first starts on a huge page
    assert b.data_ptr() - a.data_ptr() == 4096 and c.data_ptr() - b.data_ptr() == 4096
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    assert not a.any() and not b.any() and not c.any()  # zeroed, as the KV pool expects
    a.fill_(1.5), b.fill_(-2), c.fill_(3)  # writable and disjoint
    assert (a == 1.5).all() and (b == -2).all() and (c == 3).all()
    with pytest.raises(MemoryError, match="0 bytes left"):
        arena.take((1,), torch.uint8)


def test_tensors_outlive_the_arena_object():
    arena = HugePageArena(1 << 20)
    t = arena.take((256, 256), torch.float32)
    t.fill_(4.0)
    del arena
    gc.collect()
    assert float(t.sum()) == 4.0 * 256 * 256


@pytest.mark.skipif(not sys.platform.startswith("linux") or not THP.exists(), reason="Linux transparent huge pages")
def test_the_mapping_is_advised_for_huge_pages():
    arena = HugePageArena(4 * HUGE_PAGE)
    t = arena.take((HUGE_PAGE,), torch.uint8)
    assert arena.huge_pages_advised
    assert "hg" in vm_flags(t.data_ptr())  # MADV_HUGEPAGE, as the kernel records it
    assert "hg" not in vm_flags(torch.empty(4 * HUGE_PAGE, dtype=torch.uint8).data_ptr())


@pytest.mark.skipif(not sys.platform.startswith("linux") or not THP.exists(), reason="Linux transparent huge pages")
def test_a_cpu_kv_pool_lives_in_huge_pages_and_starts_zeroed():
    pool = KVSlotPool(64, num_layers=2, num_kv_heads=3, head_dim=8, dtype=torch.bfloat16)
    assert pool.kv.shape == (2, 2, 64, 3, 8) and (pool.kv == 0).all()
    assert "hg" in vm_flags(pool.kv.data_ptr())
