"""Linear layers and embeddings over GGUF (ggml) quantized blocks, kept packed as the file holds them.

A :class:`QuantizedTensor` is a ``[rows, row_bytes]`` uint8 view of ggml blocks (often a read-only view of a
memory-mapped GGUF file: it is never copied). :func:`quant_matmul` multiplies activations by it without a dense
copy of the weight; :func:`dequantize` expands only the rows asked for (the embedding lookup).

    >>> import numpy as np, gguf
    >>> w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    >>> blocks = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    >>> qt = QuantizedTensor(torch.from_numpy(blocks), gguf.GGMLQuantizationType.Q8_0, (8, 64))
    >>> layer = QuantLinear(qt)
    >>> layer(torch.randn(3, 64)).shape
    torch.Size([3, 8])
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sglite.runtime.kernels.ggml_kernels import kernel_level, level_index, set_kernel_level

__all__ = [
    "SUPPORTED_QTYPES", "QuantEmbedding", "QuantFormatError", "QuantLinear", "QuantizedTensor",
    "dequantize", "kernel_level", "quant_matmul", "set_kernel_level",
]

Q = gguf.GGMLQuantizationType

SUPPORTED_QTYPES = frozenset(
    {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.F16, Q.BF16, Q.F32}
)
"""ggml block formats the kernels read (the float rows too, for tensors a GGUF keeps unquantized)."""

FLOAT_TYPES = {int(Q.F32): torch.float32, int(Q.F16): torch.float16, int(Q.BF16): torch.bfloat16}
"""Unquantized ggml rows: viewed as their dtype and multiplied by torch, not by the ggml kernels."""


class QuantFormatError(ValueError):
    """A quantized tensor or its activations do not fit the kernels (the message names what to change)."""


def block_geometry(qtype: int) -> tuple[int, int]:
    """``(values per block, bytes per block)`` of a supported ggml type; raises naming an unsupported one."""
    if qtype not in SUPPORTED_QTYPES:
        name = Q(qtype).name if qtype in Q._value2member_map_ else str(qtype)
        supported = ", ".join(sorted(Q(t).name for t in SUPPORTED_QTYPES))
        raise QuantFormatError(f"unsupported quantization type {name}; supported: {supported}")
    return gguf.GGML_QUANT_SIZES[Q(qtype)]


@dataclass
class QuantizedTensor:
    """A 2-D weight in ggml block layout: ``data`` is uint8 ``[rows, cols / block_size * block_bytes]``."""

    data: torch.Tensor
    """uint8 ``[rows, row_bytes]``, each row ``cols / block_size`` consecutive blocks (may be a read-only mmap view)."""
    qtype: int
    """A ``gguf.GGMLQuantizationType`` value."""
    shape: tuple[int, int]
    """``(rows, cols)`` = ``(out_features, in_features)`` of the dense matrix it stands for."""

    def __post_init__(self) -> None:
        self.qtype = int(self.qtype)
        block_size, block_bytes = block_geometry(self.qtype)
        rows, cols = (int(n) for n in self.shape)
        self.shape = (rows, cols)
        if self.data.dtype != torch.uint8 or self.data.dim() != 2:
            raise QuantFormatError(
                f"QuantizedTensor.data must be a 2-D uint8 tensor of blocks, got {self.data.dtype} {tuple(self.data.shape)}"
            )
        if cols % block_size:
            raise QuantFormatError(
                f"{Q(self.qtype).name} rows hold blocks of {block_size} values: in_features (cols) {cols} "
                f"is not a multiple of {block_size}"
            )
        expected = (rows, cols // block_size * block_bytes)
        if tuple(self.data.shape) != expected:
            raise QuantFormatError(
                f"{Q(self.qtype).name} tensor of shape {self.shape} needs data of shape {expected} "
                f"(bytes), got {tuple(self.data.shape)}"
            )
        if self.data.stride(1) != 1:
            raise QuantFormatError("QuantizedTensor.data rows must be contiguous bytes (stride 1 along a row)")

    @property
    def nbytes(self) -> int:
        """Bytes of the packed blocks (what a matmul reads from memory)."""
        return self.data.shape[0] * self.data.shape[1]

    @property
    def name(self) -> str:
        return Q(self.qtype).name


def _dequantize_reference(qt: QuantizedTensor, rows: torch.Tensor | None) -> torch.Tensor:
    """gguf's numpy dequantizer over the selected rows (the slow, always-available path)."""
    data = qt.data if rows is None else qt.data.index_select(0, rows.reshape(-1).to(torch.long))
    array = data.numpy()
    if not array.flags.writeable:  # gguf's numpy code may view into its input; keep the mmap untouched
        array = array.copy()
    dense = gguf.quants.dequantize(array, Q(qt.qtype))
    return torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)).reshape(-1, qt.shape[1])


def dequantize(qt: QuantizedTensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The dense float32 ``[n, cols]`` matrix of ``qt`` (only ``rows``, in their order, when given).

        >>> import gguf
        >>> w = torch.arange(64, dtype=torch.float32).reshape(2, 32)
        >>> qt = QuantizedTensor(torch.from_numpy(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)),
        ...                      gguf.GGMLQuantizationType.Q8_0, (2, 32))
        >>> dequantize(qt, torch.tensor([1])).shape
        torch.Size([1, 32])
    """
    if rows is not None:
        if rows.dtype not in (torch.int32, torch.int64):
            raise QuantFormatError(f"rows must be an integer tensor of row indices, got {rows.dtype}")
        # (a traced graph cannot branch on values: there the C++ op checks the range itself)
        if not torch.compiler.is_compiling() and rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= qt.shape[0]):
            raise QuantFormatError(f"row index out of range for a tensor of {qt.shape[0]} rows")
    if qt.qtype in FLOAT_TYPES:
        dense = _float_view(qt)
        return (dense if rows is None else dense[rows.reshape(-1)]).to(torch.float32)
    index = level_index()
    if index < 0:
        return _dequantize_reference(qt, rows)
    return torch.ops.sglite.ggml_dequantize(qt.data, rows, qt.qtype, qt.shape[1], index)


def _float_view(qt: QuantizedTensor) -> torch.Tensor:
    """The float rows of an F32/F16/BF16 tensor as a ``[rows, cols]`` view of its bytes (no copy)."""
    return qt.data.view(FLOAT_TYPES[qt.qtype])


def _check_activations(x: torch.Tensor, qt: QuantizedTensor) -> None:
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise QuantFormatError(f"quant_matmul takes float32 or bfloat16 activations, got {x.dtype}")
    if x.shape[-1] != qt.shape[1]:
        raise QuantFormatError(
            f"activations have {x.shape[-1]} features but the {qt.name} weight of shape {qt.shape} expects {qt.shape[1]}"
        )


def quant_matmul(x: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    """``x @ W.T`` for the quantized ``W``: ``[..., cols]`` -> ``[..., rows]`` in ``x``'s dtype."""
    _check_activations(x, qt)
    if qt.qtype in FLOAT_TYPES:
        return F.linear(x, _float_view(qt).to(x.dtype))
    index = level_index()
    if index < 0:
        return F.linear(x.to(torch.float32), _dequantize_reference(qt, None)).to(x.dtype)
    return torch.ops.sglite.ggml_quant_matmul(x, qt.data, qt.qtype, qt.shape[0], index)


class QuantLinear(nn.Module):
    """``nn.Linear`` over a :class:`QuantizedTensor` weight (and an optional dense bias).

    The blocks are a non-persistent buffer (``.to()`` and memory accounting see them; ``state_dict`` does not);
    ``forward`` is one op call, as the engine runs a few hundred linear layers per decoded token.
    """

    def __init__(self, weight: QuantizedTensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = weight
        self.qtype = weight.qtype
        self.out_features, self.in_features = weight.shape
        self.register_buffer("blocks", weight.data, persistent=False)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise QuantFormatError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float32), requires_grad=False)
        self._native = weight.qtype not in FLOAT_TYPES

    @property
    def weight_bytes(self) -> int:
        """Bytes of the packed weight blocks (the bias not included)."""
        return self.weight.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = level_index()
        if self._native and index >= 0:  # the C++ op checks dtype and shape itself
            out = torch.ops.sglite.ggml_quant_matmul(x, self.blocks, self.qtype, self.out_features, index)
        else:
            out = quant_matmul(x, self.weight)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.weight.name}"


class QuantEmbedding(nn.Module):
    """``nn.Embedding`` over a quantized table: a lookup dequantizes only the looked-up rows.

    As a tied LM head, multiply by the same blocks: ``quant_matmul(hidden, embedding.weight)``.
    """

    def __init__(self, weight: QuantizedTensor) -> None:
        super().__init__()
        self.weight = weight
        self.num_embeddings, self.embedding_dim = weight.shape
        self.register_buffer("blocks", weight.data, persistent=False)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the packed table."""
        return self.weight.nbytes

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize(self.weight, ids.reshape(-1)).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.weight.name}"
