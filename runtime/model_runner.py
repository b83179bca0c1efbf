"""Loads a model and runs forwards over the KV slot pool."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from sglite.runtime.kv_pool import KVSlotPool
from sglite.runtime.forward_batch import ForwardBatch
from sglite.runtime.kernels.thread_tuner import ThreadTuner

def pick_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextmanager
def intra_op_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads, then restore the caller's setting.

    With torch's OpenMP backend the count is per calling thread, so the engine's step loop
    choosing 1 leaves every other thread of the process as it was.

        >>> before = torch.get_num_threads()
        >>> with intra_op_threads(1):
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
    """
    before = torch.get_num_threads()
    if count is None or count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ModelRunner:
    """The model, its device and dtype; ``forward`` returns float32 logits for the rows asked for.

    A GGUF file keeps its quantized blocks (float32 activations) unless ``dtype`` is given, which loads
    dense dequantized weights; GPTQ/AWQ checkpoints load as ggml blocks (:mod:`sglite.runtime.loading.gguf_model`,
    :mod:`sglite.runtime.loading.gptq_awq`).

    ``quantization`` (``int8`` | ``int4``, CPU only) stores the linear weights quantized (see
    :mod:`sglite.runtime.loading.quantization`). ``num_threads`` fixes the CPU threads of every forward;
    None lets a :class:`~sglite.runtime.kernels.thread_tuner.ThreadTuner` choose per forward size between
    one thread and the caller's count, by timing both. Either way the count applies to the calling
    thread for the forward only.

    ``enable_torch_compile`` runs decode batches of up to ``torch_compile_max_bs`` sequences through a
    :class:`~sglite.runtime.compiled_decode.CompiledDecode`; its code is generated for one thread count
    (``num_threads``, else the caller's), so the tuner only picks threads for the eager forwards.
    """

    def __init__(
        self,
        model_path: str,
        device: str | None = None,
        dtype: str | None = None,
        quantization: str | None = None,
        num_threads: int | None = None,
        enable_torch_compile: bool = False,
        torch_compile_max_bs: int = 32,
        native_kernels: bool = True,
        packed_linear: str = "auto",
        cpu_kernel_level: str = "auto",
    ) -> None:
        from sglite.runtime.loading.model_loader import load_model
        from sglite.runtime.loading.quantization import QuantizationError, check_method, quantize_model

        check_method(quantization)
        self.device = pick_device(device)
        if quantization is not None and self.device.type != "cpu":
            raise QuantizationError(f"quantization={quantization!r} runs on CPU only; drop it on {self.device}")
        if self.device.type == "cpu":
            from sglite.runtime.kernels.ggml_kernels import request_kernel_level

            request_kernel_level(cpu_kernel_level)  # checked before the load; quantized layers load it
        if quantization is not None and dtype in (None, "auto"):
            dtype = "float32"  # int8/int4 quantize dense weights (a GGUF is dequantized first)
        self.model, self.hf_config = load_model(model_path, device=str(self.device), dtype=dtype)
        self.dtype = self.model.dtype  # a GGUF keeps its blocks by default, with float32 activations
        self.model.fuse_projections()  # one matmul for q/k/v and one for gate/up, per layer
        self.quantization = quantization
        if quantization is not None:
            quantize_model(self.model, quantization)
        self.num_threads = num_threads
        default_threads = torch.get_num_threads()
        self.thread_tuner = ThreadTuner(candidates=(1, default_threads)) if default_threads > 1 else None
        if self.device.type == "cpu":
            from sglite.runtime.kernels import library
            from sglite.runtime.kernels.packed_linear import pack_linears

            if native_kernels:  # decode attention in place, greedy picks, panel matmuls (falls back when it cannot build)
                library.load()
            # weights packed once, not per call; a compiled step traces the plain ones of oneDNN layers
            pack_linears(self.model, keep_dense=enable_torch_compile, kind=packed_linear)
        self.compiled_decode = None
        if enable_torch_compile:
            from sglite.runtime.compiled_decode import CompiledDecode

            self.compiled_decode = CompiledDecode(self.model, torch_compile_max_bs)
            self.compiled_threads = num_threads or default_threads

    def make_pool(self, size: int) -> KVSlotPool:
        m = self.model
        return KVSlotPool(size, m.num_layers, m.num_kv_heads, m.head_dim, dtype=self.dtype, device=self.device)

    def threads_for(self, num_tokens: int) -> int | None:
        """CPU threads for a forward over ``num_tokens`` new tokens (None: leave the caller's count)."""
        if self.device.type != "cpu":
            return None
        if self.num_threads is not None:
            return self.num_threads
        return self.thread_tuner.choose(num_tokens) if self.thread_tuner is not None else None

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
        if self.compiled_decode is not None and self.compiled_decode.accepts(batch):
            with intra_op_threads(self.compiled_threads if dev.type == "cpu" else None):
                return self.compiled_decode.run(batch, pool, logit_rows.to(dev))
        num_tokens = batch.input_ids.numel()
        threads = self.threads_for(num_tokens)
        start = time.perf_counter()
        with intra_op_threads(threads):
            hidden = self.model.forward(batch, pool, logit_rows.to(dev))
            if logit_rows.numel() == 0:
                logits = torch.empty(0, self.model.vocab_size)
            else:
                logits = self.model.compute_logits(hidden).float()
        if threads is not None and self.num_threads is None and self.thread_tuner is not None:
            self.thread_tuner.record(num_tokens, threads, time.perf_counter() - start)
        return logits
