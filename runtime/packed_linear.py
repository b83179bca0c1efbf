"""Linear layers whose weights are laid out once, at load, for oneDNN's CPU matmul.

``F.linear`` on a CPU tensor hands a plain ``[out, in]`` matrix to MKL (float32) or oneDNN
(bfloat16), which copy it into their blocked layout inside every call; for the small activation
blocks of decode and chunked prefill that copy is a large part of the call. Reordered once
(``mkldnn::_reorder_linear_weight``, the layout inductor's freezing pass gives its constants), the
same products run 1.1-1.3x faster for float32 prefill rows and up to 2x for bfloat16 decode rows
(SmolLM2-135M's shapes, one thread; README "Speed").

The reordered weight is opaque (torch's ``_mkldnn`` layout: no strides, no views), so it is held
outside the module's parameters. The plain weight is kept only where something else still reads
it: a captured decode step (``torch.compile`` traces :func:`F.linear` over the plain weight and
prepacks its own copy) or a head tied to the input embedding (the embedding holds it anyway).

    >>> layer = nn.Linear(64, 32)
    >>> packed = PackedLinear.from_linear(layer, keep_dense=False)
    >>> x = torch.randn(3, 64)
    >>> bool(torch.allclose(packed(x), layer(x), atol=1e-5))
    True
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

DISABLE_ENV = "SGLITE_PACKED_LINEAR"
"""Set to ``0`` to keep every linear layer on ``F.linear`` (for comparisons)."""


def packing_supported(dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU run oneDNN linear layers in ``dtype`` natively."""
    if os.environ.get(DISABLE_ENV, "1") == "0" or not torch.backends.mkldnn.is_available():
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


class PackedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` in oneDNN's layout; ``weight`` is the plain one where kept, else None."""

    def __init__(self, packed: torch.Tensor, bias: nn.Parameter | None, weight: nn.Parameter | None) -> None:
        super().__init__()
        self.out_features, self.in_features = packed.shape
        self._packed = (packed,)  # a tuple: not a buffer, so state_dict, .to() and compile never see the opaque layout
        self.bias = bias
        self.weight = weight

    @classmethod
    def from_linear(cls, linear: nn.Linear, keep_dense: bool) -> PackedLinear:
        """Reorder ``linear``'s weight; keep the plain one too when ``keep_dense``."""
        weight = linear.weight.detach()
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)  # None: any number of rows
        return cls(packed, linear.bias, linear.weight if keep_dense else None)

    def kernel_bytes(self) -> int:
        """Bytes of weight (and bias) one call reads."""
        packed = self._packed[0]
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return packed.numel() * packed.element_size() + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and (torch.compiler.is_compiling() or x.device.type != "cpu"):
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed[0], self.bias, "none", [], "")

    def extra_repr(self) -> str:
        kept = "plain weight kept" if self.weight is not None else "packed only"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kept}"


def pack_linears(model: nn.Module, keep_dense: bool) -> int:
    """Replace every CPU ``nn.Linear`` of ``model`` whose dtype oneDNN runs natively by a
    :class:`PackedLinear`, in place; returns how many. ``keep_dense`` keeps each plain weight
    beside its packed copy (for a compiled decode step); a weight shared with another module (a tied
    output head) is kept regardless, since the other module holds it."""
    shared = _shared_weights(model)
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            weight = getattr(child, "weight", None)
            if type(child) is not nn.Linear or weight.device.type != "cpu" or not packing_supported(weight.dtype):
                continue
            setattr(parent, name, PackedLinear.from_linear(child, keep_dense or id(weight) in shared))
            replaced += 1
    return replaced


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters held by more than one module."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, count in seen.items() if count > 1}
