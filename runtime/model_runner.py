"""Loads a model and runs forwards over the KV slot pool."""

from __future__ import annotations

import torch

from sglite.runtime.kv_pool import KVSlotPool
from sglite.runtime.forward_batch import ForwardBatch

def pick_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class ModelRunner:
    """The model, its device and dtype; ``forward`` returns float32 logits for the rows asked for."""

    def __init__(self, model_path: str, device: str | None = None, dtype: str | None = None) -> None:
        from sglite.runtime.model_loader import load_model, resolve_dtype

        self.device = pick_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model, self.hf_config = load_model(model_path, device=str(self.device), dtype=self.dtype)

    def make_pool(self, size: int) -> KVSlotPool:
        m = self.model
        return KVSlotPool(size, m.num_layers, m.num_kv_heads, m.head_dim, dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, pool: KVSlotPool, logit_rows: torch.Tensor) -> torch.Tensor:
        dev = self.device
        if dev.type != "cpu":
            batch = ForwardBatch(
                input_ids=batch.input_ids.to(dev, non_blocking=True),
                positions=batch.positions.to(dev, non_blocking=True),
                out_slots=batch.out_slots.to(dev, non_blocking=True),
                prefix_lens=batch.prefix_lens,
                extend_lens=batch.extend_lens,
                kv_slots=[s.to(dev, non_blocking=True) for s in batch.kv_slots],
            )
        hidden = self.model.forward(batch, pool)
        if logit_rows.numel() == 0:
            return torch.empty(0, self.model.vocab_size)
        return self.model.compute_logits(hidden[logit_rows.to(dev)]).float()
