"""The one rule for which keys a query sees, and its additive form: shared by every attention path."""

from __future__ import annotations

import torch


def visible_keys(keys: torch.Tensor, queries: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """Boolean: key position ``k`` is visible to query position ``q`` iff ``k <= q`` and, with a sliding
    window ``w``, ``k > q - w`` (transformers' rule). Broadcasts ``keys`` against ``queries``.

        >>> visible_keys(torch.arange(4)[None, :], torch.tensor([[1], [3]]), sliding_window=2).int().tolist()
        [[1, 1, 0, 0], [0, 0, 1, 1]]
    """
    visible = keys <= queries
    if sliding_window is not None:
        visible &= keys > queries - sliding_window
    return visible


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``visible``, -inf elsewhere, in ``dtype`` (what SDPA would turn a boolean mask into on every call).

        >>> additive_mask(torch.tensor([True, False]), torch.float32).tolist()
        [0.0, -inf]
    """
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))
