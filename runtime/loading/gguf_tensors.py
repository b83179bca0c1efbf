"""A GGUF file's tensors as Hugging Face named tensors: dequantized, renamed, Q/K rows restored.

llama.cpp names tensors ``blk.{i}.attn_q.weight`` and, for the ``llama`` family, stores Q and K
with the rows of each head interleaved (its RoPE rotates adjacent pairs, HF's rotates the two
halves); ``unpermute_rows`` puts them back so the HF rotary code applies.

    >>> import numpy as np
    >>> stored = np.array([0, 3, 1, 4, 2, 5]).reshape(6, 1)   # HF rows 0..5 of one head, as llama.cpp orders them
    >>> unpermute_rows(stored, heads=1)[:, 0].tolist()
    [0, 1, 2, 3, 4, 5]
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from sglite.runtime.loading.gguf_metadata import ROPE_FREQS_TENSOR, GGUFArchitecture, UnsupportedGGUFError, UnsupportedGGUFQuantizationError

if TYPE_CHECKING:
    import torch
    from sglite.runtime.loading.gguf_file import GGUFFile as GGUFReader, GGUFTensor as ReaderTensor

SUPPORTED_QUANT_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)
"""GGML tensor types dequantized here (through ``gguf.quants``)."""

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
"""``blk.{i}.<gguf>.weight`` -> ``model.layers.{i}.<hf>.weight`` (same for ``.bias``)."""
BLOCK_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str:
    """The Hugging Face parameter name of a GGUF tensor.

        >>> hf_name("blk.3.ffn_down.weight")
        'model.layers.3.mlp.down_proj.weight'
    """
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    match = BLOCK_PATTERN.fullmatch(gguf_name)
    if match is None or match.group(2) not in BLOCK_NAMES:
        raise UnsupportedGGUFError(f"GGUF tensor {gguf_name!r} has no Hugging Face equivalent in sglite's mapping")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{BLOCK_NAMES[part]}.{kind}"


def unpermute_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row order: stored ``[h, i, pair]`` rows become HF's ``[h, pair, i]``."""
    head_rows = rows.shape[0] // heads
    grouped = rows.reshape(heads, head_rows // 2, 2, *rows.shape[1:])
    return grouped.swapaxes(1, 2).reshape(rows.shape)


def check_type(tensor: ReaderTensor) -> None:
    """Raise :class:`UnsupportedGGUFQuantizationError` naming ``tensor`` unless its type is supported."""
    type_name = tensor.tensor_type.name
    if type_name not in SUPPORTED_QUANT_TYPES:
        raise UnsupportedGGUFQuantizationError(
            f"GGUF tensor {tensor.name} is stored as {type_name}, which sglite does not dequantize; "
            f"supported types: {', '.join(SUPPORTED_QUANT_TYPES)}"
        )


def dequantize(tensor: ReaderTensor) -> np.ndarray:
    """``tensor`` as float32 in Hugging Face's ``[out, in]`` layout (GGUF lists dims innermost first)."""
    from gguf import quants

    check_type(tensor)
    values = quants.dequantize(tensor.data, tensor.tensor_type)
    # A copy: F32/F16 tensors come back as read-only views of the memory-mapped file.
    return np.array(values, dtype=np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))


def _torch_dtype(type_name: str) -> torch.dtype:
    """Keep F16/BF16 tensors in their own (exact) dtype; everything dequantized is float32."""
    import torch

    return {"F16": torch.float16, "BF16": torch.bfloat16}.get(type_name, torch.float32)


def hf_tensors(
    reader: GGUFReader, spec: GGUFArchitecture, num_heads: int, num_kv_heads: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of ``reader`` as ``(hf_name, tensor)``, one at a time (peak memory: one tensor)."""
    import torch

    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS_TENSOR:
            continue  # read into the config, not a parameter
        name = hf_name(tensor.name)
        values = dequantize(tensor)
        if spec.permuted_qk and ".self_attn.q_proj." in name:
            values = unpermute_rows(values, num_heads)
        elif spec.permuted_qk and ".self_attn.k_proj." in name:
            values = unpermute_rows(values, num_kv_heads)
        yield name, torch.from_numpy(values).to(_torch_dtype(tensor.tensor_type.name))
