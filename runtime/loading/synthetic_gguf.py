"""Random-weight GGUF files with the exact shapes and metadata of released models, written offline.

Tests load and decode them with a few layers; ``benchmarks/scale.py`` writes them whole to measure load
time and memory against llama.cpp on the same file. Quantized tensors are random blocks (random codes,
a fixed block scale chosen so each weight has standard deviation ``0.5 / sqrt(in_features)``), so
writing an 8B file costs what writing its bytes costs. The tokenizer metadata is copied from another
GGUF (the embedded SmolLM2 by default), its vocabulary padded with unreachable tokens (or cut, with the merges
that stay within it) to the real model's row count: llama.cpp wants one token per embedding row.

    >>> from sglite.runtime.loading.synthetic_gguf import SHAPES
    >>> shape = SHAPES["llama-3.2-1b"]
    >>> shape.hidden_size, shape.num_key_value_heads, shape.tie_word_embeddings
    (2048, 8, True)
    >>> write_synthetic_gguf(shape, "llama-1b-2-layers.gguf", num_layers=2)       # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ModelShape:
    """What a released model's GGUF header says about its shape (the fields llama.cpp's converter writes)."""

    architecture: str
    """``general.architecture``: ``llama`` or ``qwen2``."""
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    """Rows of the embedding (Qwen pads past its tokenizer's size)."""
    tie_word_embeddings: bool
    rope_theta: float
    context_length: int
    rms_norm_eps: float = 1e-5
    llama3_rope: tuple[float, float, float, int] | None = None
    """``(factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)``, written as ``rope_freqs``."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


_LLAMA31_ROPE = (8.0, 1.0, 4.0, 8192)
_LLAMA32_ROPE = (32.0, 1.0, 4.0, 8192)
SHAPES: dict[str, ModelShape] = {
    "tinyllama-1.1b": ModelShape("llama", 2048, 5632, 22, 32, 4, 32000, False, 10000.0, 2048),
    "llama-3.2-1b": ModelShape("llama", 2048, 8192, 16, 32, 8, 128256, True, 500000.0, 131072, 1e-5, _LLAMA32_ROPE),
    "llama-3.2-3b": ModelShape("llama", 3072, 8192, 28, 24, 8, 128256, True, 500000.0, 131072, 1e-5, _LLAMA32_ROPE),
    "llama-3.1-8b": ModelShape("llama", 4096, 14336, 32, 32, 8, 128256, False, 500000.0, 131072, 1e-5, _LLAMA31_ROPE),
    "qwen2.5-0.5b": ModelShape("qwen2", 896, 4864, 24, 14, 2, 151936, True, 1000000.0, 32768, 1e-6),
    "qwen2.5-1.5b": ModelShape("qwen2", 1536, 8960, 28, 12, 2, 151936, True, 1000000.0, 32768, 1e-6),
    "qwen2.5-7b": ModelShape("qwen2", 3584, 18944, 28, 28, 4, 152064, False, 1000000.0, 32768, 1e-6),
}
"""Shapes of released instruct models (their config.json / GGUF headers)."""

SCALE_OFFSETS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}
"""Byte offsets of each block's float16 scale fields (the rest of a block is random codes)."""


def llama3_rope_factors(head_dim: int, theta: float, rope: tuple[float, float, float, int]) -> np.ndarray:
    """The ``rope_freqs`` tensor llama.cpp's converter writes for a Llama 3.1+ ``rope_scaling``."""
    factor, low_freq_factor, high_freq_factor, original = rope
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    low_wavelen, high_wavelen = original / low_freq_factor, original / high_freq_factor
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def random_blocks(rows: int, cols: int, qtype_name: str, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``[rows, row_bytes]`` of random ``qtype_name`` blocks whose values have std ~ ``0.5 / sqrt(cols)``."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[qtype_name]
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    blocks = np.frombuffer(rng.bytes(rows * cols // block * block_bytes), dtype=np.uint8).reshape(rows, -1, block_bytes).copy()
    offsets = SCALE_OFFSETS[qtype_name]

    def set_scale(value: float) -> None:
        raw = np.frombuffer(np.float16(value).tobytes(), dtype=np.uint8)
        for offset in offsets:
            blocks[..., offset:offset + 2] = raw

    set_scale(1.0)
    probe = quants.dequantize(blocks[:1].reshape(1, -1), qtype)
    set_scale(0.5 / math.sqrt(cols) / max(float(probe.std()), 1e-12))
    return blocks.reshape(rows, -1)


def _value_type(value: object):
    from gguf import GGUFValueType

    if isinstance(value, bool):
        return GGUFValueType.BOOL
    if isinstance(value, int):
        return GGUFValueType.UINT32 if value >= 0 else GGUFValueType.INT32
    if isinstance(value, float):
        return GGUFValueType.FLOAT32
    return GGUFValueType.STRING


def _copy_tokenizer(writer, tokenizer_from: str | os.PathLike, vocab_size: int) -> None:
    """Copy every ``tokenizer.*`` field of another GGUF (token types as int32, as llama.cpp writes them),
    the vocabulary padded with unreachable tokens to ``vocab_size`` (llama.cpp wants one token per embedding row)."""
    from gguf import GGUFValueType

    from sglite.runtime.loading.gguf_file import GGUFFile

    fields = dict(GGUFFile(tokenizer_from).fields)
    tokens = fields["tokenizer.ggml.tokens"]
    if len(tokens) > vocab_size:  # keep the first vocab_size tokens and the merges that stay within them
        kept = set(tokens[:vocab_size])
        fields["tokenizer.ggml.tokens"] = tokens[:vocab_size]
        for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            if key in fields:
                fields[key] = fields[key][:vocab_size]
        fields["tokenizer.ggml.merges"] = [
            m for m in fields.get("tokenizer.ggml.merges", []) if all(p in kept for p in m.split(" ")) and m.replace(" ", "") in kept
        ]
    missing = vocab_size - len(fields["tokenizer.ggml.tokens"])
    if missing > 0:
        fields["tokenizer.ggml.tokens"] = fields["tokenizer.ggml.tokens"] + [f"<unused_{i}>" for i in range(missing)]
        for key, pad in (("tokenizer.ggml.token_type", 1), ("tokenizer.ggml.scores", 0.0)):
            if key in fields:
                fields[key] = fields[key] + [pad] * missing
    for key, value in fields.items():
        if not key.startswith("tokenizer."):
            continue
        if isinstance(value, list):
            item = GGUFValueType.INT32 if value and type(value[0]) is int else _value_type(value[0] if value else "")
            writer.add_key_value(key, value, GGUFValueType.ARRAY, item)
        else:
            writer.add_key_value(key, value, _value_type(value))


def write_synthetic_gguf(
    shape: ModelShape,
    out: str | os.PathLike,
    qtype: str = "Q4_0",
    num_layers: int | None = None,
    tokenizer_from: str | os.PathLike | None = None,
    seed: int = 0,
) -> Path:
    """Write a random-weight GGUF of ``shape`` (``num_layers`` blocks, default all) quantized as ``qtype``.

    Norms, biases and ``rope_freqs`` are float32, everything else ``qtype`` blocks (Q4_0, Q4_1, Q5_0, Q5_1,
    Q8_0, Q4_K, Q6_K). Tensors are streamed to the file one at a time (memory: one tensor).
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

    from sglite.runtime.loading.default_model import default_gguf_path

    out = Path(out)
    arch, layers = shape.architecture, num_layers or shape.num_hidden_layers
    hidden, inter, head_dim = shape.hidden_size, shape.intermediate_size, shape.head_dim
    q_dim, kv_dim = shape.num_attention_heads * head_dim, shape.num_key_value_heads * head_dim
    writer = GGUFWriter(str(out), arch)
    writer.add_name(f"synthetic {arch} {hidden}x{layers}")
    writer.add_block_count(layers)
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(shape.num_attention_heads)
    writer.add_head_count_kv(shape.num_key_value_heads)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_norm_eps)
    writer.add_vocab_size(shape.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    _copy_tokenizer(writer, tokenizer_from or default_gguf_path(), shape.vocab_size)

    # (name, [rows, cols] or [n], kind): kind "q" = quantized blocks, "f" = float32 ones, "b" = float32 bias,
    # "r" = rope factors
    tensors: list[tuple[str, tuple[int, ...], str]] = [("token_embd.weight", (shape.vocab_size, hidden), "q")]
    if shape.llama3_rope is not None:
        tensors.append(("rope_freqs.weight", (head_dim // 2,), "r"))
    for i in range(layers):
        block = f"blk.{i}"
        tensors += [(f"{block}.attn_norm.weight", (hidden,), "f"),
                    (f"{block}.attn_q.weight", (q_dim, hidden), "q"),
                    (f"{block}.attn_k.weight", (kv_dim, hidden), "q"),
                    (f"{block}.attn_v.weight", (kv_dim, hidden), "q")]
        if arch == "qwen2":
            tensors += [(f"{block}.attn_q.bias", (q_dim,), "b"), (f"{block}.attn_k.bias", (kv_dim,), "b"),
                        (f"{block}.attn_v.bias", (kv_dim,), "b")]
        tensors += [(f"{block}.attn_output.weight", (hidden, q_dim), "q"),
                    (f"{block}.ffn_norm.weight", (hidden,), "f"),
                    (f"{block}.ffn_gate.weight", (inter, hidden), "q"),
                    (f"{block}.ffn_up.weight", (inter, hidden), "q"),
                    (f"{block}.ffn_down.weight", (hidden, inter), "q")]
    tensors.append(("output_norm.weight", (hidden,), "f"))
    if not shape.tie_word_embeddings:
        tensors.append(("output.weight", (shape.vocab_size, hidden), "q"))

    raw = GGMLQuantizationType[qtype]
    block, block_bytes = GGML_QUANT_SIZES[raw]
    for name, dims, kind in tensors:
        if kind == "q":
            rows, cols = dims
            writer.add_tensor_info(name, (rows, cols // block * block_bytes), np.dtype(np.uint8),
                                   rows * cols // block * block_bytes, raw_dtype=raw)
        else:
            writer.add_tensor_info(name, dims, np.dtype(np.float32), 4 * math.prod(dims))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, dims, kind in tensors:
        if kind == "q":
            writer.write_tensor_data(random_blocks(*dims, qtype, rng))
        elif kind == "f":
            writer.write_tensor_data(np.ones(dims, dtype=np.float32))
        elif kind == "b":
            writer.write_tensor_data((0.1 * rng.standard_normal(dims)).astype(np.float32))
        else:
            writer.write_tensor_data(llama3_rope_factors(head_dim, shape.rope_theta, shape.llama3_rope))
    writer.close()
    return out
