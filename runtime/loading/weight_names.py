"""What every checkpoint reader agrees on about tensor names: the ones skipped, and the error for a mismatch."""

from __future__ import annotations

# Old checkpoints saved RoPE tables as weights; we recompute them.
IGNORED_WEIGHT_SUFFIXES = ("rotary_emb.inv_freq",)


class WeightMismatchError(ValueError):
    """The checkpoint's tensors do not match the architecture its config describes."""
