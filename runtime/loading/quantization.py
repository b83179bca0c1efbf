"""Weight-only quantization of a loaded model's linear layers, run through torch's packed CPU kernels.

A decode step at small batch reads every weight once per token, so its speed is set by weight
bytes: ``int8`` (per-output-channel symmetric, 1 byte a weight) and ``int4`` (groups of 32 along
the input, asymmetric min/max like GGUF's Q4_1: 4-bit codes plus a bfloat16 scale and zero per
group, 5 bits a weight) read 2x and 3.2x fewer bytes than bfloat16. Activations stay in the model's dtype; the packed kernels compute in bfloat16.

Those kernels are matrix-*vector* kernels: their cost grows with every activation row, so past
:data:`KERNEL_MAX_ROWS` rows (prefill chunks, wide decode batches) a layer dequantizes its weight to a
dense matrix for that one call instead, and a head tied to the input embedding uses the embedding
itself. Quantized output drifts from float output: see docs/performance.md for measured
agreement, and ``tests/test_quantization.py``.

    >>> import torch
    >>> from torch import nn
    >>> layer = nn.Linear(64, 32, bias=False)
    >>> q = QuantizedLinear.from_linear(layer, "int8")
    >>> x = torch.randn(2, 64)
    >>> bool((q(x) - layer(x)).abs().max() < 0.05)
    True
"""

from __future__ import annotations

import torch
from torch import nn

QUANTIZATION_METHODS = ("int8", "int4")
INT4_GROUP_SIZE = 32
KERNEL_MAX_ROWS = {"int8": 16, "int4": 64}
"""Most activation rows sent through the packed kernel; past it, dequantize and run a dense matmul.
The kernels cost grows linearly with rows; dequantizing int4 (unpack nibbles, scale, shift) costs about
as much as 60 kernel rows, int8's about 16 (measured on 1536x576 layers, bfloat16, one thread)."""
TIED_HEAD_KERNEL_MAX_ROWS = 4
"""The same for an output head tied to the (unquantized) embedding, whose dense path costs no dequantization."""


class QuantizationError(ValueError):
    """A quantization method that is unknown, or that a layer's shape cannot take."""


def check_method(method: str | None) -> None:
    """Raise :class:`QuantizationError` unless ``method`` is None or one of :data:`QUANTIZATION_METHODS`."""
    if method is not None and method not in QUANTIZATION_METHODS:
        raise QuantizationError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} or None, got {method!r}")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8 [N, K], scales float32 [N])`` with ``weight ~= codes * scales[:, None]``."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    codes = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scales


def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes uint8 [N, K] in 0..15, scale_zero float32 [K / group, N, 2])``.

    Within each group of ``group_size`` inputs, ``weight ~= (code - 8) * scale + zero`` (the
    packed kernel's convention), with codes spanning the group's min..max.
    """
    n, k = weight.shape
    groups = weight.detach().float().view(n, k // group_size, group_size)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scales = ((high - low) / 15).clamp(min=1e-12)
    codes = torch.round((groups - low) / scales).clamp(0, 15).to(torch.uint8).view(n, k)
    zeros = low + 8 * scales
    scale_zero = torch.stack([scales.view(n, -1), zeros.view(n, -1)], dim=-1).transpose(0, 1).contiguous()
    return codes, scale_zero


class QuantizedLinear(nn.Module):
    """A bias-optional linear layer whose weight is stored quantized (``int8`` or ``int4``)."""

    def __init__(
        self,
        method: str,
        out_features: int,
        in_features: int,
        bias: torch.Tensor | None,
        dense_fallback: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        check_method(method)
        self.method, self.out_features, self.in_features = method, out_features, in_features
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        # A float weight equal to this layer's unquantized one, kept anyway elsewhere (a tied
        # embedding); held in a tuple so that it is not registered as this layer's parameter.
        self._dense_fallback = (dense_fallback,) if dense_fallback is not None else ()
        self.kernel_max_rows = KERNEL_MAX_ROWS[method] if dense_fallback is None else TIED_HEAD_KERNEL_MAX_ROWS

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, method: str, dense_fallback: torch.Tensor | None = None
    ) -> QuantizedLinear:
        """Quantize ``linear``'s weight; ``dense_fallback`` as in :attr:`dense_fallback`."""
        weight = linear.weight
        out_features, in_features = weight.shape
        layer = cls(method, out_features, in_features, linear.bias, dense_fallback)
        if method == "int8":
            codes, scales = quantize_int8(weight)
            layer.register_buffer("codes", codes)
            layer.register_buffer("scales", scales.to(torch.bfloat16))
        else:
            if in_features % INT4_GROUP_SIZE or out_features % 16:
                raise QuantizationError(
                    f"int4 needs in_features divisible by {INT4_GROUP_SIZE} and out_features by 16, "
                    f"got a {out_features}x{in_features} weight; use quantization='int8'"
                )
            codes, scale_zero = quantize_int4(weight)
            # The kernel's blocked layout cannot be unpacked cheaply, so the plain codes are kept
            # nibble-packed beside it for the dense path (1 byte a weight in all, 0.5 read per decode).
            layer.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1))
            layer.register_buffer("nibbles", codes[:, 0::2] | (codes[:, 1::2] << 4))
            layer.register_buffer("scale_zero", scale_zero.to(torch.bfloat16))
        return layer

    def kernel_bytes(self) -> int:
        """Bytes the packed kernel reads per call: what one decode step at small batch costs this layer."""
        names = ("codes", "scales") if self.method == "int8" else ("packed", "scale_zero")
        tensors = [getattr(self, n) for n in names] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``[out, in]`` weight this layer computes with."""
        if self.method == "int8":
            return self.codes.to(dtype) * self.scales.to(dtype)[:, None]
        n, k = self.out_features, self.in_features
        codes = torch.stack([self.nibbles & 15, self.nibbles >> 4], dim=-1).view(n, k // INT4_GROUP_SIZE, INT4_GROUP_SIZE)
        scale, zero = self.scale_zero.to(dtype).transpose(0, 1).unbind(-1)  # [N, K / group] each
        return ((codes.to(dtype) - 8) * scale[..., None] + zero[..., None]).view(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] > self.kernel_max_rows or x.device.type != "cpu":
            weight = self._dense_fallback[0] if self._dense_fallback else self.dequantize(x.dtype)
            out = rows @ weight.to(x.dtype).t()
        else:
            activations = rows.to(torch.bfloat16)
            if self.method == "int8":
                out = torch._weight_int8pack_mm(activations, self.codes, self.scales)
            else:
                out = torch.ops.aten._weight_int4pack_mm_for_cpu(activations, self.packed, INT4_GROUP_SIZE, self.scale_zero)
            out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.method}, in_features={self.in_features}, out_features={self.out_features}"


def quantize_model(model: nn.Module, method: str) -> int:
    """Replace every ``nn.Linear`` of ``model`` by a :class:`QuantizedLinear` in place; returns how many.

    An output head tied to the input embedding is quantized too (it is a sixth of a small model's
    weights); the embedding itself stays dense for lookups and serves the head's wide calls.
    """
    check_method(method)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    tied_weight = embed.weight if embed is not None else None
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                tied = tied_weight is not None and child.weight is tied_weight
                setattr(parent, name, QuantizedLinear.from_linear(child, method, tied_weight if tied else None))
                replaced += 1
    return replaced
