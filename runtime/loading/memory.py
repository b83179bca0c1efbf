"""How much memory a model needs: weights, KV cache per token, and the size of the engine's slot pool.

Pure functions of a Hugging Face config; nothing is loaded. The KV figure is the one that decides how
many tokens a server can keep cached: ``2 (K and V) * layers * kv_heads * head_dim * bytes``. With
grouped-query attention ``kv_heads`` is a fraction of the query heads, so the naive
``2 * layers * hidden * bytes`` overstates it by ``heads / kv_heads`` (4x for Llama-3-8B).

    >>> from transformers import LlamaConfig
    >>> config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
    ...                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)
    >>> param_count(config), kv_bytes_per_token(config, 2)   # Llama-2-7B in fp16
    (6738415616, 524288)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from sglite.runtime.dtypes import DTYPE_BYTES, dtype_name
from sglite.runtime.models import MODEL_REGISTRY
from sglite.runtime.models.layers import head_dim_of


DEFAULT_OVERHEAD_FRACTION = 0.10
"""Activations, the allocator's fragmentation and runtime buffers, as a fraction of weights + KV."""
CPU_MEMORY_FRACTION = 0.25
"""Share of the host's available RAM the KV pool may take on CPU: the OS, weights and tokenizer need the rest."""
CUDA_MEMORY_FRACTION = 0.85
"""Share of the GPU's free memory (after the weights are loaded) the KV pool may take; the rest is activations."""
CPU_POOL_CONTEXTS = 8
"""On CPU the pool holds at most this many full contexts: more cache than a CPU can usefully serve."""


def dtype_size(dtype: str | torch.dtype) -> int:
    """Bytes per element of ``dtype`` (``"bfloat16"``, ``torch.float16``, ...)."""
    return DTYPE_BYTES[dtype_name(dtype)]




def _kv_heads(config: PretrainedConfig) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def kv_bytes_per_token(config: PretrainedConfig, dtype_bytes: int) -> int:
    """Bytes of KV cache one token occupies across all layers: ``2 * layers * kv_heads * head_dim * bytes``."""
    return 2 * config.num_hidden_layers * _kv_heads(config) * head_dim_of(config) * dtype_bytes


def param_count(config: PretrainedConfig) -> int:
    """Parameters of a llama / mistral / qwen2 / qwen3 causal LM, counted from its config."""
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_REGISTRY:
        raise ValueError(
            f"cannot count parameters of model_type={model_type!r}; supported: {', '.join(sorted(MODEL_REGISTRY))}"
        )
    hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    q_dim = config.num_attention_heads * head_dim_of(config)
    kv_dim = _kv_heads(config) * head_dim_of(config)
    attention_bias = bool(getattr(config, "attention_bias", False))  # llama / qwen3: on q, k, v and o

    attention = 2 * hidden * q_dim + 2 * hidden * kv_dim  # q, o (full heads) and k, v (GQA heads)
    if model_type == "qwen2":
        attention += q_dim + 2 * kv_dim  # qwen2 always biases q, k, v (not o)
    elif attention_bias:
        attention += q_dim + 2 * kv_dim + hidden
    if model_type == "qwen3":
        attention += 2 * head_dim_of(config)  # per-head RMSNorm on q and k
    mlp = 3 * hidden * inter  # gate, up, down
    if getattr(config, "mlp_bias", False):
        mlp += 2 * inter + hidden
    layer = attention + mlp + 2 * hidden  # input and post-attention RMSNorm

    embeddings = vocab * hidden
    lm_head = 0 if getattr(config, "tie_word_embeddings", False) else vocab * hidden
    return embeddings + config.num_hidden_layers * layer + hidden + lm_head  # + final norm


def weight_bytes(config: PretrainedConfig, dtype_bytes: int) -> int:
    """Bytes of the model's weights at ``dtype_bytes`` per parameter."""
    return param_count(config) * dtype_bytes


@dataclass(frozen=True)
class MemoryEstimate:
    """Memory to serve ``batch`` sequences of ``context`` tokens (all sizes in bytes)."""

    weight_bytes: int
    """The model's parameters."""
    kv_bytes_per_token: int
    """KV cache of one token, all layers."""
    context: int
    """Tokens per sequence (prompt + output)."""
    batch: int
    """Sequences held at once."""
    kv_bytes: int
    """``kv_bytes_per_token * context * batch``."""
    overhead_bytes: int
    """Activations and allocator slack: ``overhead_fraction * (weights + KV)``."""
    total_bytes: int
    """Weights + KV + overhead."""
    dtype: str = "bfloat16"
    """The element type all of the above assume."""
    weight_note: str = ""
    """How the weights are stored, when not as ``dtype`` (a GGUF file's block types)."""


def estimate(
    config: PretrainedConfig,
    context: int = 4096,
    batch: int = 1,
    dtype: str | torch.dtype = "bfloat16",
    overhead_fraction: float = DEFAULT_OVERHEAD_FRACTION,
    stored_weight_bytes: int | None = None,
    weight_note: str = "",
) -> MemoryEstimate:
    """Estimate the memory to serve ``batch`` sequences of ``context`` tokens in ``dtype``.

    ``stored_weight_bytes`` replaces the weights' size at ``dtype`` by the bytes they are kept in (a GGUF
    file's quantized blocks, which sglite keeps as they are), described by ``weight_note``.

        >>> from transformers import LlamaConfig
        >>> est = estimate(LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
        ...                            num_attention_heads=4, vocab_size=100), context=10)
        >>> est.kv_bytes == 10 * est.kv_bytes_per_token
        True
    """
    if context <= 0 or batch <= 0:
        raise ValueError(f"context and batch must be positive, got context={context}, batch={batch}")
    size = dtype_size(dtype)
    weights = weight_bytes(config, size) if stored_weight_bytes is None else stored_weight_bytes
    per_token = kv_bytes_per_token(config, size)
    kv = per_token * context * batch
    overhead = int(overhead_fraction * (weights + kv))
    name = str(dtype).removeprefix("torch.")
    return MemoryEstimate(weights, per_token, context, batch, kv, overhead, weights + kv + overhead, name, weight_note)


def max_kv_tokens(
    config: PretrainedConfig,
    memory_bytes: int,
    dtype: str | torch.dtype = "bfloat16",
    overhead_fraction: float = DEFAULT_OVERHEAD_FRACTION,
) -> int:
    """Tokens of KV cache that fit in ``memory_bytes`` next to the weights and overhead (0 if none).

    The inverse of ``estimate``: ``(weights + tokens * kv_per_token) * (1 + overhead) <= memory_bytes``.
    """
    size = dtype_size(dtype)
    usable = memory_bytes / (1 + overhead_fraction) - weight_bytes(config, size)
    return max(0, math.floor(usable / kv_bytes_per_token(config, size)))


def available_host_memory() -> int:
    """Bytes of RAM the OS could give this process now (psutil when installed, else /proc or sysconf)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def pool_size_for(
    config: PretrainedConfig,
    dtype: str | torch.dtype,
    device: str | torch.device,
    requested: int | None = None,
    context_length: int | None = None,
) -> int:
    """Number of KV slots (tokens) the engine's pool should have. Call it after the weights are loaded.

    - ``requested`` (the user's ``max_total_tokens``) wins when given.
    - CUDA: ``CUDA_MEMORY_FRACTION`` of the free GPU memory, as SGLang sizes its pool.
    - CPU and others: ``CPU_MEMORY_FRACTION`` of the available RAM, capped at ``CPU_POOL_CONTEXTS``
      contexts of ``context_length`` (default ``config.max_position_embeddings``) tokens.

        >>> from transformers import LlamaConfig
        >>> pool_size_for(LlamaConfig(), "float32", "cpu", requested=1024)
        1024
    """
    if requested is not None:
        if requested <= 0:
            raise ValueError(f"max_total_tokens must be positive, got {requested}")
        return int(requested)
    per_token = kv_bytes_per_token(config, dtype_size(dtype))
    device = torch.device(device)
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        tokens = int(free_bytes * CUDA_MEMORY_FRACTION) // per_token
    else:
        context_length = context_length or getattr(config, "max_position_embeddings", None) or 4096
        tokens = min(int(available_host_memory() * CPU_MEMORY_FRACTION) // per_token, CPU_POOL_CONTEXTS * context_length)
    if tokens <= 0:
        raise MemoryError(
            f"no memory left for the KV cache on {device} ({per_token} bytes per token); "
            "free memory, use a smaller dtype, or pass max_total_tokens"
        )
    return tokens


def _human(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num_bytes) < 1024:
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.2f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.2f} TiB"


def _count(n: float) -> str:
    """12_345_678 -> '12.35 M' (billions, millions, thousands as a reader would say them)."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)}"


def format_estimate(est: MemoryEstimate) -> str:
    """A small table of an estimate, for humans."""
    params = est.weight_bytes / DTYPE_BYTES.get(est.dtype, 2)
    rows = [
        ("weights", _human(est.weight_bytes), est.weight_note or f"{_count(params)} params in {est.dtype}"),
        ("KV cache / token", _human(est.kv_bytes_per_token), ""),
        ("KV cache", _human(est.kv_bytes), f"{est.context} tokens x {est.batch} sequence(s)"),
        ("overhead", _human(est.overhead_bytes), "activations, allocator slack"),
        ("total", _human(est.total_bytes), ""),
    ]
    return "\n".join(f"{name:<18}{size:>12}  {note}".rstrip() for name, size, note in rows)


def load_config(model: str) -> PretrainedConfig:
    """The text config of ``model``: a local directory (or config.json) or a Hugging Face id in the local cache."""
    from transformers import AutoConfig

    from sglite.runtime.loading.gguf_loader import find_gguf, is_gguf

    if is_gguf(model):  # read from the file's metadata; no conversion just to estimate
        from sglite.runtime.loading.gguf_metadata import hf_config_from_gguf

        return hf_config_from_gguf(find_gguf(model))
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")  # huggingface_hub's own variable
    try:
        config = AutoConfig.from_pretrained(model, local_files_only=offline)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"no model config found for {model!r}: pass a directory containing config.json, "
            f"or a Hugging Face id that is in the local cache ({error.__class__.__name__}: {error})"
        ) from error
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def gguf_weight_bytes(model: str, config: PretrainedConfig) -> tuple[int | None, str]:
    """``(bytes, note)`` of a GGUF file's tensors as stored (what sglite keeps in memory by default), or
    ``(None, "")`` for any other model."""
    from collections import Counter

    from sglite.runtime.loading.gguf_loader import find_gguf, is_gguf
    from sglite.runtime.loading.gguf_metadata import open_gguf

    if not is_gguf(model):
        return None, ""
    tensors = open_gguf(find_gguf(model)).tensors
    stored = sum(t.n_bytes for t in tensors)
    types = Counter(t.tensor_type.name for t in tensors)
    kinds = ", ".join(f"{count} {name}" for name, count in types.most_common())
    return stored, f"{_count(param_count(config))} params as stored in the file ({kinds} tensors)"


def _config_dtype(config: PretrainedConfig) -> str:
    """The dtype the checkpoint was saved in, when it is one we size; bfloat16 otherwise."""
    saved = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)).removeprefix("torch.")
    return saved if saved in DTYPE_BYTES else "bfloat16"


def main_estimate(argv: list[str]) -> int:
    """``python -m sglite estimate MODEL [--context N] [--batch B] [--dtype D] [--memory-gb G]``."""
    parser = argparse.ArgumentParser(prog="sglite estimate", description="Estimate the memory to serve a model.")
    parser.add_argument("model", help="a local model directory (with config.json), a .gguf file, or a cached Hugging Face id")
    parser.add_argument("--context", type=int, default=4096, help="tokens per sequence (default 4096)")
    parser.add_argument("--batch", type=int, default=1, help="sequences held at once (default 1)")
    parser.add_argument(
        "--dtype", type=lambda d: d if d == "auto" else dtype_name(d), default="auto",
        help="float32, bfloat16 or float16 (bf16, fp16, ... accepted); default: the config's dtype",
    )
    parser.add_argument("--memory-gb", type=float, default=None, help="also report how many KV tokens fit in G GiB")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.model)
        dtype = _config_dtype(config) if args.dtype == "auto" else args.dtype
        stored, note = gguf_weight_bytes(args.model, config) if args.dtype == "auto" else (None, "")
        est = estimate(config, context=args.context, batch=args.batch, dtype=dtype, stored_weight_bytes=stored,
                       weight_note=note)
    except (FileNotFoundError, ValueError) as error:
        print(f"sglite estimate: error: {error}", file=sys.stderr)
        return 2
    print(f"{args.model} ({config.model_type}, {config.num_hidden_layers} layers, "
          f"{_kv_heads(config)}/{config.num_attention_heads} KV/query heads)")
    print(format_estimate(est))
    if args.memory_gb is not None:
        budget = int(args.memory_gb * 1024**3)
        tokens = max_kv_tokens(config, budget, dtype)
        verdict = "fits" if est.total_bytes <= budget else "does NOT fit"
        print(f"\nin {args.memory_gb:g} GiB: {tokens} KV tokens ({tokens // args.context} sequences of "
              f"{args.context}); this estimate {verdict}")
    return 0
