"""Engine configuration: one frozen dataclass, mapped one-to-one to CLI flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sglite.runtime.dtypes import dtype_name


CPU_KERNEL_LEVELS = ("auto", "avx512", "avx2", "portable")
"""Values of ``cpu_kernel_level`` (the kernels module checks the CPU has the level at engine start)."""

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
"""Batch sizes compiled for; a batch runs in the smallest bucket that holds it."""


def batch_bucket(batch_size: int) -> int:
    """The compiled batch size that serves ``batch_size`` sequences.

        >>> [batch_bucket(n) for n in (1, 3, 8, 9, 100)]
        [1, 4, 8, 16, 128]
    """
    return next(b for b in BATCH_BUCKETS if b >= batch_size)


def check_max_batch_size(max_batch_size: int) -> None:
    """Raise ``ValueError`` naming ``torch_compile_max_bs`` unless it is 1 .. the largest bucket."""
    if not isinstance(max_batch_size, int) or not 1 <= max_batch_size <= BATCH_BUCKETS[-1]:
        raise ValueError(f"torch_compile_max_bs must be an integer from 1 to {BATCH_BUCKETS[-1]}, got {max_batch_size!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Options of ``sglite.Engine`` (and of ``python -m sglite serve``)."""

    max_total_tokens: int | None = None
    """KV pool size in tokens; None sizes it from free memory (see ``python -m sglite estimate``)."""
    max_running_requests: int = 64
    """Most requests decoding at once."""
    chunked_prefill_size: int = 512
    """Most prompt tokens prefilled in one step; long prompts are split into chunks of this size."""
    schedule_policy: str = "lpm"
    """``lpm``: waiting requests with the longest cached prefix first; ``fcfs``: arrival order."""
    disable_radix_cache: bool = False
    """Turn prefix sharing off (for benchmarks): every request computes its whole prompt."""
    device: str | None = None
    """``cpu``, ``cuda``, ``cuda:1``…; None picks CUDA when available."""
    dtype: str | None = None
    """``float32``, ``bfloat16`` or ``float16`` (aliases ``bf16``, ``fp16``, ``fp32``, ... are normalised);
    None or ``auto`` is float32 on CPU, bfloat16 on CUDA."""
    context_length: int | None = None
    """Most prompt + output tokens per request; None takes the model's ``max_position_embeddings``."""
    jump_forward: bool = True
    """Append text forced by a regex/JSON constraint without sampling it token by token."""
    grammar_backend: str = "llguidance"
    """Constraint compiler: ``llguidance`` (full JSON Schema, context-free grammars) or ``outlines`` (regex DFAs)."""
    random_seed: int = 0
    """Seeds the generators of requests that give no ``seed``."""
    num_threads: int | None = None
    """CPU threads of each model forward (set on the engine's own step thread only, never process-wide);
    None times one thread against torch's default per forward size and keeps the faster (re-checked now and
    then, so it follows the machine's load)."""
    quantization: str | None = None
    """Weight-only quantization on CPU: ``int8`` (per channel) or ``int4`` (groups of 32); None keeps the
    checkpoint's weights in ``dtype``. Decode at small batch reads 2x / 3.2x fewer weight bytes than
    bfloat16; greedy output drifts from float (README, "Speed")."""

    cpu_kernel_level: str = "auto"
    """Kernels of quantized (GGUF block) linear layers on CPU: ``auto`` picks the fastest this CPU runs
    (``avx512`` with VNNI, ``avx2`` with FMA/F16C, else ``portable``); naming a lower level forces it (to test or
    compare it), naming one the CPU lacks is an error at engine start."""

    enable_torch_compile: bool = False
    """Capture the decode step with ``torch.compile`` (SGLang's flag): fused C++ (CPU) or Triton (CUDA) kernels and,
    on CPU, frozen weights and autotuned GEMM kernels. Each decode batch size (1, 2, 4, 8, 16, 32) compiles on first
    use, 1-2 minutes on 2 cores, and keeps its own packed weights; bfloat16 decode then ran 2.9x / 1.8x / 1.3x faster
    than eager at batch 1 / 8 / 32 on SmolLM2-135M (README, "Speed")."""
    torch_compile_max_bs: int = 32
    """Largest decode batch run through the compiled step (SGLang's flag); wider ones run eagerly."""

    def __post_init__(self) -> None:
        if self.schedule_policy not in ("lpm", "fcfs"):
            raise ValueError(f"schedule_policy must be 'lpm' or 'fcfs', got {self.schedule_policy!r}")
        for name in ("max_running_requests", "chunked_prefill_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        check_max_batch_size(self.torch_compile_max_bs)  # before the (slow) model load, as every flag here
        if self.num_threads is not None and (not isinstance(self.num_threads, int) or self.num_threads < 1):
            raise ValueError(f"num_threads must be a positive integer, got {self.num_threads!r}")
        if self.max_total_tokens is not None and self.max_total_tokens < 2:
            raise ValueError(f"max_total_tokens must be at least 2, got {self.max_total_tokens}")
        if self.grammar_backend not in ("llguidance", "outlines"):
            raise ValueError(f"grammar_backend must be 'llguidance' or 'outlines', got {self.grammar_backend!r}")
        if self.quantization not in (None, "int8", "int4"):
            raise ValueError(f"quantization must be 'int8', 'int4' or None, got {self.quantization!r}")
        if self.cpu_kernel_level not in CPU_KERNEL_LEVELS:
            raise ValueError(f"cpu_kernel_level must be one of {', '.join(CPU_KERNEL_LEVELS)}, got {self.cpu_kernel_level!r}")
        if self.dtype is not None and self.dtype != "auto":
            object.__setattr__(self, "dtype", dtype_name(self.dtype))  # "bf16" -> "bfloat16", as the loader reads it

    @classmethod
    def from_options(cls, **options) -> EngineConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown engine option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**options)
