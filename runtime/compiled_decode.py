"""A captured decode step: ``torch.compile`` of the whole decode forward, SGLang's ``--enable-torch-compile``.

On a CPU a decode step of a small model is hundreds of small operators (norms, rotary, residual
adds, attention over a few keys) between its matmuls, each paying Python and dispatch overhead.
Inductor turns the step into a few fused C++ loops around the matmuls, and with *freezing* it
treats the weights as constants and prepacks them for oneDNN, whose packed bfloat16 GEMV reads
weights much faster than an unpacked matmul (README, "Speed"). On CUDA the same graph compiles to
Triton kernels.

What is captured is :meth:`LlamaForCausalLM.decode_step`: it reads the KV pool and writes nothing,
returning the new tokens' K/V, which :meth:`CompiledDecode.run` stores in the pool afterwards (a
graph that mutated the pool would make inductor copy it). Shapes are dynamic (batch size, context
width), so one compilation serves every batch; size 1 gets its own (torch specializes it), and so
may the quantized output head's kernel-or-dense switch. The first decode step of each pays the
compile: about a minute on a 2-core CPU, seconds once inductor's on-disk cache is warm.

Prefill chunks, mixed prefill/decode batches, batches past ``max_batch_size``, contexts longer than
a sliding window and batches whose contexts differ so much that padding them to the longest would
more than double the keys read all run the eager path, which groups sequences by context length.
"""

from __future__ import annotations

import torch
from torch import nn

from sglite.runtime.forward_batch import ForwardBatch
from sglite.runtime.kv_pool import KVSlotPool
from sglite.runtime.models.attention import MIN_KV_BUCKET
from sglite.runtime.models.decode_attention import DecodeContext


class CompiledDecode:
    """The model's decode step compiled once (lazily, on first use) and reused for every decode batch.

        >>> step = CompiledDecode(model, max_batch_size=32)              # doctest: +SKIP
        >>> if step.accepts(batch):                                       # doctest: +SKIP
        ...     logits = step.run(batch, pool, logit_rows)                # K/V stored in pool
    """

    def __init__(self, model: nn.Module, max_batch_size: int = 32) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        windows = [layer.self_attn.sliding_window for layer in model.model.layers]
        self.window = min((w for w in windows if w is not None), default=None)
        # freezing: weights are graph constants, prepacked for oneDNN's CPU kernels
        options = {"freezing": True} if model.device.type == "cpu" else {}
        self._step = torch.compile(model.decode_step, dynamic=True, fullgraph=True, options=options)
        self.steps = 0
        """Decode steps run through the compiled graph (a counter for tests and stats)."""

    def accepts(self, batch: ForwardBatch) -> bool:
        """Whether ``batch`` is a decode batch this graph serves (else the caller runs the eager path)."""
        if batch.batch_size > self.max_batch_size or any(n != 1 for n in batch.extend_lens):
            return False
        longest = max(batch.prefix_lens)
        if self.window is not None and longest + 1 > self.window:
            return False
        # Every row is padded to the longest context; the eager path's groups avoid that when it doubles the work.
        return batch.batch_size * longest <= 2 * sum(batch.prefix_lens) + batch.batch_size * MIN_KV_BUCKET

    def run(self, batch: ForwardBatch, pool: KVSlotPool, logit_rows: torch.Tensor) -> torch.Tensor:
        """float32 logits of ``logit_rows``; the new tokens' K/V land at ``batch.out_slots``."""
        device = pool.kv.device
        cached = DecodeContext.from_slots([slots[:-1] for slots in batch.kv_slots]).to(device)
        logits, new_kv = self._step(batch.input_ids, batch.positions, pool.kv, cached)
        pool.kv.index_copy_(2, batch.out_slots, new_kv)  # [layers, 2, B, kv_heads, d] into [layers, 2, slots, ...]
        self.steps += 1
        return logits.index_select(0, logit_rows)
