"""Which KV is reused: the slot pool (who owns free slots) and the radix tree (who owns cached ones)."""

from sglite.radix.slot_pool import KVSlotPool
from sglite.radix.tree import RadixCache, TreeNode

__all__ = ["KVSlotPool", "RadixCache", "TreeNode"]
