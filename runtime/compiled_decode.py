"""A captured decode step: ``torch.compile`` of the whole decode forward, SGLang's ``--enable-torch-compile``.

On a CPU a decode step of a small model is hundreds of small operators (norms, rotary, residual
adds, attention over a few keys) between its matmuls, each paying Python and dispatch overhead, and
its matmuls are matrix-vector products that torch's unpacked kernels run far below memory bandwidth.
Inductor turns the step into a few fused C++ loops around the matmuls, called from a generated C++
wrapper (no Python between kernels). bfloat16 layers on
CPUs with AVX512-BF16 stay calls of sglite's panel kernel (:mod:`~sglite.runtime.kernels.panel_gemm`, weights
packed once at load); for other linear layers *freezing* makes the weights constants and
*max-autotune* picks, per matmul shape, between oneDNN/MKL and inductor's own C++ GEMM templates over
prepacked weights, timing each (docs/performance.md). On CUDA the same graph compiles to Triton kernels
(no freezing or autotuning there).

What is captured is :meth:`LlamaForCausalLM.decode_step`: it reads the KV pool and writes nothing,
returning the new tokens' K/V, which :meth:`CompiledDecode.run` stores in the pool afterwards (a
graph that mutated the pool would make inductor copy it). The matmul shapes are static: a batch is
padded with dummy rows up to the next of :data:`BATCH_BUCKETS` (the CPU analogue of SGLang's CUDA-graph
batch sizes) and each bucket compiles once, on its first use: on a 2-core CPU about 37 s for a bfloat16
SmolLM2 over panels (17 s with Python's wrapper instead of the C++ one), 1-2 minutes where GEMMs are autotuned.
The context width is dynamic (one graph serves every context length of a bucket).

Prefill chunks, mixed prefill/decode batches, batches past ``max_batch_size`` and contexts longer
than a sliding window run the eager path. So do batches whose contexts differ so much that padding
them to the longest would more than double the keys read, unless the C++ decode attention
(:mod:`~sglite.runtime.kernels.paged_decode`) is loaded: it reads each row's own keys.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from sglite.runtime.forward_batch import ForwardBatch
from sglite.runtime.kv_pool import KVSlotPool
from sglite.runtime.models.attention import MIN_KV_BUCKET
from sglite.runtime.kernels import library as native_kernels
from sglite.runtime.config import BATCH_BUCKETS, batch_bucket, check_max_batch_size  # noqa: F401 - re-exported
from sglite.runtime.models.decode_attention import DecodeContext
from sglite.runtime.token_selection import take_rows


logger = logging.getLogger(__name__)

RECOMPILE_LIMIT = 256
"""Graphs of ``decode_step`` kept per process (buckets x engines x models)."""


class CompiledDecode:
    """The model's decode step compiled once (lazily, on first use) and reused for every decode batch.

        >>> step = CompiledDecode(model, max_batch_size=32)              # doctest: +SKIP
        >>> if step.accepts(batch):                                       # doctest: +SKIP
        ...     logits = step.run(batch, pool, logit_rows)                # K/V stored in pool
    """

    def __init__(self, model: nn.Module, max_batch_size: int = 32) -> None:
        self.max_batch_size = max_batch_size
        windows = [layer.self_attn.sliding_window for layer in model.model.layers]
        self.window = min((w for w in windows if w is not None), default=None)
        check_max_batch_size(max_batch_size)
        # freezing: weights are graph constants (prepacked); max_autotune: time the GEMM kernels per shape
        # (linear layers outside sglite's panel kernel); cpp_wrapper: kernels called from C++, not Python.
        # Inductor reads `freezing` from its config at compile time, not from torch.compile(options=...),
        # so each call patches the config (~20 us; it only matters when a bucket compiles).
        self.cpu = cpu = model.device.type == "cpu"
        self._inductor_config = {
            "freezing": True,
            "max_autotune": True,
            "autotune_num_choices_displayed": 0,  # the engine logs its own line per compile, not inductor's tables
            "max_autotune_report_choices_stats": False,
            "cpp_wrapper": True,
        } if cpu else {}
        # dynamic=False: the batch (matmul rows) stays static per bucket even after recompiles; only
        # the context width is marked dynamic, per call
        self._step = torch.compile(model.decode_step, dynamic=False, fullgraph=True)
        self.steps = 0
        """Decode steps run through the compiled graph (a counter for tests and stats)."""
        self.buckets_used: set[int] = set()
        """Batch buckets compiled so far (each compiled on its first step)."""

    def accepts(self, batch: ForwardBatch) -> bool:
        """Whether ``batch`` is a decode batch this graph serves (else the caller runs the eager path)."""
        if batch.batch_size > self.max_batch_size or any(n != 1 for n in batch.extend_lens):
            return False
        longest = max(batch.prefix_lens)
        if self.window is not None and longest + 1 > self.window:
            return False
        if self.cpu and native_kernels.is_loaded():
            return True  # the C++ kernel reads each row's own keys: padding kv_index costs nothing
        # Every row is padded to the longest context; the eager path's groups avoid that when it doubles the work.
        return batch.batch_size * longest <= 2 * sum(batch.prefix_lens) + batch.batch_size * MIN_KV_BUCKET

    def run(self, batch: ForwardBatch, pool: KVSlotPool, logit_rows: torch.Tensor) -> torch.Tensor:
        """float32 logits of ``logit_rows``; the new tokens' K/V land at ``batch.out_slots``."""
        device = pool.kv.device
        size, bucket = batch.batch_size, batch_bucket(batch.batch_size)
        # Dummy rows: token 0 at position 0 with no cached keys (it attends to itself only); never stored.
        padding = bucket - size
        cached_slots = [slots[:-1] for slots in batch.kv_slots] + [batch.kv_slots[0][:0]] * padding
        cached = DecodeContext.from_slots(cached_slots).to(device)
        # Always new tensors made here (under the runner's inference mode): dynamo guards on whether an input
        # is an inference tensor, and a mix would compile every bucket twice.
        input_ids = torch.cat((batch.input_ids, batch.input_ids.new_zeros(padding)))
        positions = torch.cat((batch.positions, batch.positions.new_zeros(padding)))
        for tensor in (cached.kv_index, cached.kv_mask):
            torch._dynamo.mark_dynamic(tensor, 1)  # one graph per bucket for every context width
        first = bucket not in self.buckets_used
        if first:
            logger.info("compiling the decode step for batches of up to %d (once per bucket)", bucket)
            start = time.perf_counter()
        # Every engine in the process compiles the same `decode_step` code, and dynamo's recompile limit
        # (8 graphs per code object) would send the rest to eager: lift it for these calls.
        with torch._inductor.config.patch(self._inductor_config), torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            logits, new_kv = self._step(input_ids, positions, pool.kv, cached)
        if first:
            logger.info("decode step for batches of up to %d compiled in %.1f s", bucket, time.perf_counter() - start)
        # [layers, 2, bucket, kv_heads, d]: the real rows go into [layers, 2, slots, kv_heads, d]
        pool.kv.index_copy_(2, batch.out_slots, new_kv[:, :, :size])
        self.steps += 1
        self.buckets_used.add(bucket)
        return take_rows(logits[:size], logit_rows.tolist())  # usually every row, in order: no copy of [B, vocab]
