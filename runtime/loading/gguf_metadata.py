"""A GGUF file's metadata as a Hugging Face config: architecture, shapes, RoPE, special tokens.

GGUF stores hyper-parameters as ``{arch}.key`` fields (``llama.block_count``,
``llama.attention.head_count_kv``, ...); each supported architecture maps them onto the config
class its native model reads.

    >>> from sglite.runtime.loading.gguf_metadata import hf_config_from_gguf
    >>> config = hf_config_from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")      # doctest: +SKIP
    >>> config.model_type, config.num_hidden_layers, config.num_key_value_heads  # doctest: +SKIP
    ('llama', 30, 3)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sglite.runtime.loading.gguf_file import GGUFFile
    from transformers import PretrainedConfig


class UnsupportedGGUFError(ValueError):
    """A GGUF file that sglite cannot load; the message names the feature (architecture, type, tensor)."""


class UnsupportedGGUFArchitectureError(UnsupportedGGUFError):
    """``general.architecture`` names a model family with no mapping here."""


class UnsupportedGGUFQuantizationError(UnsupportedGGUFError):
    """A tensor is stored in a quantization type sglite does not dequantize."""


class GGUFShapeError(UnsupportedGGUFError):
    """The file is truncated or corrupt: a tensor's extent or shape disagrees with the file or its metadata."""


ROPE_FREQS_TENSOR = "rope_freqs.weight"
"""Llama 3.1+ files: per-frequency divisors of RoPE's inverse frequencies (llama.cpp's ``freq_factors``)."""


@dataclass(frozen=True)
class GGUFArchitecture:
    """How one ``general.architecture`` becomes a Hugging Face config and native model."""

    model_type: str
    """The Hugging Face ``model_type`` (selects the config class and the native model)."""
    hf_architecture: str
    """``config.architectures[0]``."""
    permuted_qk: bool
    """llama.cpp reorders Q/K rows of this family (its RoPE pairs adjacent dims, HF's pairs halves)."""


ARCHITECTURES: dict[str, GGUFArchitecture] = {
    # Mistral and most Llama derivatives are written with general.architecture = "llama".
    "llama": GGUFArchitecture("llama", "LlamaForCausalLM", permuted_qk=True),
    "qwen2": GGUFArchitecture("qwen2", "Qwen2ForCausalLM", permuted_qk=False),
    "qwen3": GGUFArchitecture("qwen3", "Qwen3ForCausalLM", permuted_qk=False),
}
"""``general.architecture`` -> how to map it."""


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """The parsed metadata and memory-mapped tensors of ``path``.

    A truncated or corrupt file raises :class:`GGUFShapeError` naming the tensor (or byte) where it breaks.
    """
    from sglite.runtime.loading.gguf_file import GGUFFile, GGUFFormatError

    try:
        return GGUFFile(path)
    except GGUFFormatError as error:
        raise GGUFShapeError(str(error)) from error


def field(reader: GGUFFile, key: str, default: object = None) -> object:
    """The value of metadata field ``key`` (a Python scalar, string or list), or ``default``."""
    return reader.fields.get(key, default)


def architecture_of(reader: GGUFFile) -> tuple[str, GGUFArchitecture]:
    """``(general.architecture, its mapping)``; raises for a family sglite has no model for."""
    name = str(field(reader, "general.architecture", ""))
    if name not in ARCHITECTURES:
        raise UnsupportedGGUFArchitectureError(
            f"GGUF architecture {name!r} is not supported; sglite loads {', '.join(sorted(ARCHITECTURES))} GGUF files"
        )
    return name, ARCHITECTURES[name]


def _rope_parameters(reader: GGUFFile, arch: str) -> dict:
    theta = float(field(reader, f"{arch}.rope.freq_base", 10000.0))
    scaling = str(field(reader, f"{arch}.rope.scaling.type", "none"))
    if scaling in ("none", ""):
        return {"rope_type": "default", "rope_theta": theta}
    if scaling == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": float(field(reader, f"{arch}.rope.scaling.factor"))}
    raise UnsupportedGGUFError(f"GGUF RoPE scaling {scaling!r} is not supported (only none and linear)")


def hf_config_from_gguf(source: str | os.PathLike | GGUFFile) -> PretrainedConfig:
    """The Hugging Face config that describes the model in a GGUF file (no tensor is dequantized)."""
    from transformers import AutoConfig

    reader = source if hasattr(source, "tensors") else open_gguf(source)
    arch, spec = architecture_of(reader)
    tensor_names = {tensor.name for tensor in reader.tensors}

    def need(key: str) -> int:
        value = field(reader, f"{arch}.{key}")
        if value is None:
            raise UnsupportedGGUFError(f"GGUF file has no {arch}.{key} field; is it a complete model file?")
        return int(value)

    hidden, heads = need("embedding_length"), need("attention.head_count")
    tokens = field(reader, "tokenizer.ggml.tokens")
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab_size = field(reader, f"{arch}.vocab_size") or (len(tokens) if tokens else None)
    if vocab_size is None and embedding is not None:
        vocab_size = int(embedding.shape[1])
    special = {
        name: field(reader, f"tokenizer.ggml.{name}")
        for name in ("bos_token_id", "eos_token_id")
    }
    special["pad_token_id"] = field(reader, "tokenizer.ggml.padding_token_id")
    special["unk_token_id"] = field(reader, "tokenizer.ggml.unknown_token_id")
    options = dict(
        architectures=[spec.hf_architecture],
        vocab_size=int(vocab_size),
        hidden_size=hidden,
        intermediate_size=need("feed_forward_length"),
        num_hidden_layers=need("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=int(field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(field(reader, f"{arch}.attention.key_length", hidden // heads)),
        max_position_embeddings=int(field(reader, f"{arch}.context_length", 4096)),
        rms_norm_eps=float(field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_parameters=_rope_parameters(reader, arch),
        tie_word_embeddings="output.weight" not in tensor_names,
        dtype="float32",
        **{name: int(value) for name, value in special.items() if value is not None},
    )
    rope_freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS_TENSOR), None)
    if rope_freqs is not None:  # Llama 3.1+: llama.cpp divides each inverse frequency by its factor
        head_dim = options["head_dim"]
        if int(np.prod(rope_freqs.shape)) != head_dim // 2:
            raise GGUFShapeError(f"GGUF tensor {ROPE_FREQS_TENSOR} has {int(np.prod(rope_freqs.shape))} values, "
                                 f"expected head_dim / 2 = {head_dim // 2}")
        options["rope_freq_factors"] = [float(v) for v in np.asarray(rope_freqs.data, dtype=np.float32).reshape(-1)]
    if spec.model_type != "qwen2":  # Qwen2 always has a q/k/v bias; the others say so in the config
        options["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    return AutoConfig.for_model(spec.model_type, **options)
