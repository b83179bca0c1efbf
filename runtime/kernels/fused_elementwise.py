"""A decoder layer's elementwise steps in one pass each, on a CPU: SwiGLU's ``silu(gate) * up`` and the
rotary embedding of q and k.

Written with torch operators, each is several passes over ``[tokens, width]`` with a temporary per
pass: the rotation alone slices, negates, concatenates, multiplies twice and adds. In an eager
float32 prefill of a ~1218-token prompt on SmolLM2-135M (one thread) those passes took ~0.15 s of
~3.9 s. ``fused_elementwise.cpp`` (part of sglite's C++ library, :mod:`~sglite.runtime.kernels.library`)
reads each input once and writes the result once, rounding where the torch form rounds (ATen's own
vector ``exp`` for SiLU; for bfloat16 every stored intermediate is rounded to bfloat16), so outputs
equal the torch form's. Inside a ``torch.compile`` graph, off the CPU, for other dtypes, or where the
library is not built, the torch form runs (inductor fuses it on its own).

    >>> x = torch.randn(3, 8)
    >>> torch.equal(silu_and_mul(x), F.silu(x[:, :4]) * x[:, 4:])
    True
"""

from __future__ import annotations

import torch

from sglite.runtime.kernels import ops  # noqa: F401 - the op schemas this wrapper calls
import torch.nn.functional as F

from sglite.runtime.kernels import library as native_kernels


def _runs_native(x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and native_kernels.is_loaded()
        and not torch.compiler.is_compiling()
    )


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up`` ``[..., 2 * width]`` holding gate then up; ``[..., width]``."""
    if _runs_native(gate_up):
        return torch.ops.sglite.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[T, heads, head_dim]`` by ``cos``/``sin`` ``[T, head_dim]`` (half-split layout), into
    a new tensor. ``x`` may be a view of wider rows (q and k inside a fused qkv output)."""
    if _runs_native(x) and x.stride(-1) == 1 and x.stride(1) == x.shape[-1] and cos.dtype == sin.dtype == x.dtype:
        return torch.ops.sglite.rotary(x, cos, sin)
    cos, sin = cos[:, None, :], sin[:, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
