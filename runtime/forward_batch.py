"""What one model forward computes: new tokens of several sequences, each over its own KV prefix."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    """A ragged batch. Sequence ``i`` has ``prefix_lens[i]`` tokens whose K/V already sit in the
    pool and ``extend_lens[i]`` new tokens (1 for decode, more for a prefill chunk or forced
    jump-forward text). New tokens of all sequences are concatenated in ``input_ids``.

    Sequence ``i``'s new token ``j`` sits at position ``prefix_lens[i] + j`` and attends causally to
    ``kv_slots[i][: prefix_lens[i] + j + 1]``.
    """

    input_ids: torch.Tensor
    """``[T]`` int64, T = sum(extend_lens)."""
    positions: torch.Tensor
    """``[T]`` int64 absolute positions (for RoPE)."""
    out_slots: torch.Tensor
    """``[T]`` int64: the pool slot where each new token's K/V is written."""
    prefix_lens: list[int]
    extend_lens: list[int]
    kv_slots: list[torch.Tensor]
    """Per sequence, int64 slots of all ``prefix_lens[i] + extend_lens[i]`` tokens, in order."""

    @property
    def batch_size(self) -> int:
        return len(self.extend_lens)

    def last_token_indices(self) -> torch.Tensor:
        """Row of each sequence's last new token in the flattened ``[T]`` layout."""
        ends = torch.tensor(self.extend_lens, dtype=torch.int64).cumsum(0) - 1
        return ends.to(self.input_ids.device)
