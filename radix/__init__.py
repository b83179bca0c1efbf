"""Which KV is reused: the slot allocator (who owns free slots) and the radix tree (who owns cached ones)."""

from sglite.radix.slot_pool import SlotAllocator
from sglite.radix.tree import RadixCache, TreeNode

__all__ = ["RadixCache", "SlotAllocator", "TreeNode"]
