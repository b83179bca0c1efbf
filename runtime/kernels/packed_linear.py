"""Linear layers whose weights are laid out once, at load, for a CPU matmul kernel.

``F.linear`` on a CPU tensor hands a plain ``[out, in]`` matrix to MKL (float32) or oneDNN
(bfloat16), which copy it into their blocked layout inside every call; for the small activation
blocks of decode and chunked prefill that copy is a large part of the call. Each CPU linear layer is
therefore packed once, for one of two kernels:

- ``"panels"`` (bfloat16 where the CPU has AVX512-BF16 and sglite's C++ library is built): 32-column
  panels in huge pages, run by :mod:`~sglite.runtime.kernels.panel_gemm`, which streams the weights while it
  computes.
- ``"onednn"`` (float32, and bfloat16 elsewhere): reordered by ``mkldnn::_reorder_linear_weight`` (the
  layout inductor's freezing pass gives its constants) and run by ``mkldnn::_linear_pointwise``.

The packed weight is held outside the module's parameters (oneDNN's is opaque: no strides, no views).
The plain weight is kept only where something else still reads it: a captured decode step over oneDNN
layers (``torch.compile`` traces :func:`F.linear` over the plain weight and prepacks its own copy;
panel layers are traced as the ``sglite::panel_linear`` op itself) or a head tied to the input
embedding (the embedding holds it anyway).

    >>> layer = nn.Linear(64, 32)
    >>> packed = PackedLinear.from_linear(layer, keep_dense=False)
    >>> x = torch.randn(3, 64)
    >>> bool(torch.allclose(packed(x), layer(x), atol=1e-5))
    True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sglite.runtime.kernels import panel_gemm
from sglite.runtime.kernels.huge_page_arena import HugePageArena

def packing_supported(dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU run oneDNN linear layers in ``dtype`` natively."""
    if not torch.backends.mkldnn.is_available():
        return False
    mkldnn = torch.ops.mkldnn
    if not (hasattr(mkldnn, "_reorder_linear_weight") and hasattr(mkldnn, "_linear_pointwise")):
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return bool(mkldnn._is_mkldnn_bf16_supported())  # else oneDNN emulates bfloat16 slowly
    if dtype == torch.float16:
        return bool(mkldnn._is_mkldnn_fp16_supported())
    return False


def panels_supported(weight: torch.Tensor) -> bool:
    """Whether ``weight`` runs as panels here (see :func:`sglite.runtime.kernels.panel_gemm.supports`)."""
    return panel_gemm.supports(weight)


class PackedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` packed for ``kernel`` (``"panels"`` or ``"onednn"``); ``weight`` is the
    plain one where kept, else None."""

    def __init__(
        self, packed: torch.Tensor, bias: nn.Parameter | None, weight: nn.Parameter | None, kernel: str, shape: tuple[int, int]
    ) -> None:
        super().__init__()
        self.kernel = kernel
        self.out_features, self.in_features = shape
        self._packed = (packed,)  # a tuple: not a buffer, so state_dict and .to() never see the packed layout
        self.bias = bias
        self.weight = weight

    @classmethod
    def from_linear(cls, linear: nn.Linear, keep_dense: bool, arena: HugePageArena | None = None) -> PackedLinear:
        """Pack ``linear``'s weight: as panels in ``arena`` where given, else for oneDNN (keeping the plain
        weight too when ``keep_dense``)."""
        weight = linear.weight.detach()
        if arena is not None:
            panels = arena.take(panel_gemm.panels_shape(*weight.shape), weight.dtype)
            panel_gemm.pack_panels(weight, panels)
            return cls(panels, linear.bias, None, "panels", tuple(weight.shape))
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)  # None: any number of rows
        return cls(packed, linear.bias, linear.weight if keep_dense else None, "onednn", tuple(weight.shape))

    def kernel_bytes(self) -> int:
        """Bytes of weight (and bias) one call reads."""
        packed = self._packed[0]
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return packed.numel() * packed.element_size() + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "panels":  # traced as the op itself under torch.compile
            return torch.ops.sglite.panel_linear(x, self._packed[0], self.out_features, self.bias)
        if self.weight is not None and (torch.compiler.is_compiling() or x.device.type != "cpu"):
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed[0], self.bias, "none", [], "")

    def extra_repr(self) -> str:
        kept = "plain weight kept" if self.weight is not None else "packed only"
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kernel}, {kept}"


def pack_linears(model: nn.Module, keep_dense: bool, kind: str = "auto") -> int:
    """Replace every CPU ``nn.Linear`` of ``model`` that a packed kernel runs natively by a
    :class:`PackedLinear`, in place; returns how many. Panel layers share one :class:`HugePageArena`.
    ``kind`` (``EngineConfig.packed_linear``): ``auto`` uses panels where they run, ``onednn`` never,
    ``off`` packs nothing.
    ``keep_dense`` keeps each oneDNN layer's plain weight beside its packed copy (for a compiled decode
    step); a weight shared with another module (a tied output head) is kept regardless, since the other
    module holds it."""
    if kind not in ("auto", "onednn", "off"):
        raise ValueError(f"packed linear kind must be 'auto', 'onednn' or 'off', got {kind!r}")
    if kind == "off":
        return 0
    shared = _shared_weights(model)
    layers = []  # (parent, name, linear, runs as panels)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            weight = getattr(child, "weight", None)
            if type(child) is not nn.Linear or weight.device.type != "cpu":
                continue
            if kind == "auto" and panels_supported(weight):
                layers.append((parent, name, child, True))
            elif packing_supported(weight.dtype):
                layers.append((parent, name, child, False))
    sizes = [
        weight.dtype.itemsize * math.prod(panel_gemm.panels_shape(*weight.shape))
        for weight in (child.weight for _, _, child, panels in layers if panels)
    ]
    arena = HugePageArena(HugePageArena.bytes_for(sizes)) if sizes else None
    for parent, name, child, panels in layers:
        packed = PackedLinear.from_linear(child, keep_dense, arena if panels else None)
        if id(child.weight) in shared:
            packed.weight = child.weight
        setattr(parent, name, packed)
    return len(layers)


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters held by more than one module."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, count in seen.items() if count > 1}
