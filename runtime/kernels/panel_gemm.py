"""bfloat16 linear layers over weights packed in 32-column panels, for CPUs with AVX512-BF16.

oneDNN's bfloat16 matmul, handed a decode-sized block of rows (1-32), reads each block of weights
from memory in a burst and then reuses it from cache, so the weight stream (the whole model, every
step) is not overlapped with the arithmetic. ``panel_gemm.cpp`` (part of sglite's C++ library,
:mod:`~sglite.runtime.kernels.library`) keeps up to 12 rows x 32 columns of float32 sums in registers,
walks each weight panel once per 12 rows with ``vdpbf16ps``, and from 6 rows up prefetches the next
panel a line or two per step (below that the hardware prefetchers alone keep up), weights in huge pages
(:mod:`~sglite.runtime.kernels.huge_page_arena`); docs/performance.md compares it with oneDNN.

Sums are float32 in the reduction's natural order and rounded once to bfloat16, as oneDNN's are; the
tests compare against ``F.linear``.

    >>> w = torch.randn(80, 64, dtype=torch.bfloat16)
    >>> panels = torch.empty(panels_shape(80, 64), dtype=torch.bfloat16)
    >>> pack_panels(w, panels)                                          # doctest: +SKIP
    >>> y = torch.ops.sglite.panel_linear(x, panels, 80, None)         # doctest: +SKIP
"""

from __future__ import annotations

import torch

from sglite.runtime.kernels import ops  # noqa: F401 - the op schemas this wrapper calls

from sglite.runtime.kernels import library as native_kernels

PANEL_COLUMNS = 32


def available() -> bool:
    """Whether the kernel runs here: the C++ library is loaded and the CPU has AVX512-BF16 (never builds)."""
    return native_kernels.is_loaded() and bool(torch.ops.sglite.panel_linear_available())


def supports(weight: torch.Tensor) -> bool:
    """Whether ``weight`` ``[out, in]`` can run as panels here (bfloat16 on the CPU, an even ``in``)."""
    return weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and weight.shape[1] % 2 == 0 and available()


def panels_shape(out_features: int, in_features: int) -> tuple[int, int, int, int]:
    """``[panels, in/2, 32, 2]``: the packed shape of an ``[out, in]`` weight (columns padded to 32)."""
    return (-(-out_features // PANEL_COLUMNS), in_features // 2, PANEL_COLUMNS, 2)


def pack_panels(weight: torch.Tensor, panels: torch.Tensor) -> None:
    """Write ``weight`` ``[out, in]`` into ``panels`` (:func:`panels_shape`), zero past the last column."""
    count, pairs = panels.shape[0], panels.shape[1]
    out_features = weight.shape[0]
    view = panels.view(count, pairs, PANEL_COLUMNS, 2).permute(0, 2, 1, 3)  # [panels, 32, in/2, 2]
    full = out_features // PANEL_COLUMNS
    if full:
        view[:full].copy_(weight[: full * PANEL_COLUMNS].view(full, PANEL_COLUMNS, pairs, 2))
    rest = out_features - full * PANEL_COLUMNS
    if rest:
        view[full].zero_()
        view[full, :rest].copy_(weight[full * PANEL_COLUMNS :].view(rest, pairs, 2))
