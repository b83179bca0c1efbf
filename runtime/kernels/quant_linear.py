"""Linear layers and embeddings over GGUF (ggml) quantized blocks, kept packed as the file holds them.

A :class:`QuantizedTensor` is a ``[rows, row_bytes]`` uint8 view of ggml blocks (often a read-only view of a
memory-mapped GGUF file: it is never copied). :func:`quant_matmul` multiplies activations by it without a dense
copy of the weight; :func:`dequantize` expands only the rows asked for (the embedding lookup). A
:class:`QuantLinear` over Q4_0 / Q4_K repacks once into llama.cpp's 8-row layout (same size) where the
kernel level has it, and drops the mapped source pages from RSS. docs/kernels.md has the measurements.

    >>> import numpy as np, gguf
    >>> w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    >>> blocks = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    >>> qt = QuantizedTensor(torch.from_numpy(blocks), gguf.GGMLQuantizationType.Q8_0, (8, 64))
    >>> layer = QuantLinear(qt)
    >>> layer(torch.randn(3, 64)).shape
    torch.Size([3, 8])
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from dataclasses import dataclass

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sglite.runtime.kernels.ggml_kernels import kernel_level, level_index, request_kernel_level, set_kernel_level

__all__ = [
    "SUPPORTED_QTYPES", "QuantEmbedding", "QuantFormatError", "QuantLinear", "QuantizedTensor",
    "dequantize", "kernel_level", "quant_matmul", "request_kernel_level", "set_kernel_level",
]

Q = gguf.GGMLQuantizationType

SUPPORTED_QTYPES = frozenset(
    {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.F16, Q.BF16, Q.F32}
)
"""ggml block formats the kernels read (the float rows too, for tensors a GGUF keeps unquantized)."""

_QUANT_MATMUL = torch.ops.sglite.ggml_quant_matmul.default  # the overload itself: no per-call resolution

FLOAT_TYPES = {int(Q.F32): torch.float32, int(Q.F16): torch.float16, int(Q.BF16): torch.bfloat16}
"""Unquantized ggml rows: viewed as their dtype and multiplied by torch, not by the ggml kernels."""


class QuantFormatError(ValueError):
    """A quantized tensor or its activations do not fit the kernels (the message names what to change)."""


def block_geometry(qtype: int) -> tuple[int, int]:
    """``(values per block, bytes per block)`` of a supported ggml type; raises naming an unsupported one."""
    if qtype not in SUPPORTED_QTYPES:
        try:
            name = Q(qtype).name
        except ValueError:
            name = f"ggml type {qtype}"
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


MADV_DONTNEED = 4
"""Linux ``madvise`` advice: drop these pages from the process (a read-only file mapping re-reads them on access)."""


def _read_only_file_mapping(start: int, end: int) -> bool:
    """Whether ``[start, end)`` lies in one read-only, file-backed mapping of this process (/proc/self/maps)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(a, 16) for a in fields[0].split("-"))
            if low <= start and end <= high:
                return fields[1].startswith("r-") and len(fields) >= 6 and fields[4] != "0" and fields[5].startswith("/")
    return False


def _release_mapped_pages(tensor: torch.Tensor) -> None:
    """Drop the whole pages under ``tensor`` from this process's RSS when they are a read-only view of a file
    (a repacked layer's source blocks in the memory-mapped GGUF: resident beside the packed copy they would
    double the layer's memory). Only there: such pages are re-read from the file if ever touched again, while
    anonymous memory would lose its contents. A no-op off Linux."""
    if not sys.platform.startswith("linux") or tensor.numel() == 0:
        return
    page = mmap.PAGESIZE
    start = -(-tensor.data_ptr() // page) * page
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    if end > start and _read_only_file_mapping(start, end):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)  # failure is harmless


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

    Where the running kernel level has a repacked layout for the format (Q4_0 on avx2/avx512: llama.cpp's
    8-row interleaved blocks, the same byte count), the layer repacks once, when built or when the level
    changes, and multiplies with llama.cpp's gemv/gemm kernels; otherwise it reads ``weight.data`` in place.
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
        self.register_buffer("packed", None, persistent=False)
        self._packed_level = -2  # the level index ``packed`` was made for (-2: none yet)
        self._repack(level_index())

    def _cache_tensors(self) -> None:
        # forward reads plain attributes: a buffer or parameter read goes through nn.Module.__getattr__, which
        # costs about as much as the op's own dispatch at decode sizes; _apply (``.to()`` ...) refreshes them
        self._blocks, self._packed, self._bias = self.blocks, self.packed, self.bias

    def _apply(self, fn, recurse: bool = True):
        module = super()._apply(fn, recurse)
        self._cache_tensors()
        return module

    def _repack(self, index: int) -> None:
        """Repack for level ``index`` where it has a packed layout for this format (else ``packed`` is None)."""
        packed = None
        if self._native and index >= 0:
            packed = torch.ops.sglite.ggml_repack(self.blocks, self.qtype, self.in_features, index)
            packed = packed if packed.numel() else None
            if packed is not None:
                _release_mapped_pages(self.blocks)  # the plain blocks are only read again if the level changes
        self.packed, self._packed_level = packed, index
        self._cache_tensors()

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weight blocks a matmul reads (the bias not included)."""
        return self.weight.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = level_index()
        if index != self._packed_level:
            self._repack(index)
        if self._native and index >= 0:  # the C++ op checks dtype and shape itself
            out = _QUANT_MATMUL(x, self._blocks, self.qtype, self.out_features, index, self._packed)
        else:
            out = quant_matmul(x, self.weight)
        return out if self._bias is None else out + self._bias.to(out.dtype)

    def extra_repr(self) -> str:
        packed = ", packed" if self.packed is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.weight.name}{packed}"


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
