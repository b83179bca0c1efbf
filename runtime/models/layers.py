"""Building blocks shared by every decoder family: RMSNorm, rotary position embedding, SwiGLU MLP.

Each one reproduces the operation order of its ``transformers`` counterpart, so float32 logits
agree with the reference to ~1e-6 rather than merely "closely".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from sglite.runtime.kernels.fused_elementwise import silu_and_mul

# RoPE variants whose frequencies depend on the current batch's length (HF recomputes them per
# call). With a KV cache that would rotate old keys and new queries differently, so we refuse them.
LENGTH_DEPENDENT_ROPE_TYPES = frozenset({"dynamic", "longrope"})


class RMSNorm(nn.Module):
    """Root-mean-square layer norm over the last dimension, computed in float32.

        >>> norm = RMSNorm(8, eps=1e-6)
        >>> norm(torch.ones(2, 8)).shape
        torch.Size([2, 8])
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # torch's fused kernel: the same float32 arithmetic (bit-equal to the steps below), one op
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Same order as HF: normalise in float32, cast back, *then* scale by the weight.
        input_dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(input_dtype)


def head_dim_of(config: PretrainedConfig) -> int:
    """Per-head width: the explicit ``head_dim`` (Qwen3, Mistral) or hidden_size / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_parameters_of(config: PretrainedConfig) -> dict:
    """The RoPE settings as one dict with ``rope_type`` and ``rope_theta``.

    transformers 5 keeps them in ``config.rope_parameters``; 4.x in ``rope_theta`` plus an
    optional ``rope_scaling`` dict (whose type key was once ``type``).
    """
    params = getattr(config, "rope_parameters", None)
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params = dict(params)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with the checkpoint's own frequency recipe.

    Frequencies come from ``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`` (linear,
    llama3, yarn, ...) so scaled variants match the reference bit for bit; plain RoPE is
    computed here because transformers 5 no longer registers a ``"default"`` entry. A config with
    ``rope_freq_factors`` (from a GGUF's ``rope_freqs`` tensor) divides each inverse frequency by its
    factor, as llama.cpp does.

        >>> from transformers import LlamaConfig
        >>> rope = RotaryEmbedding(LlamaConfig(hidden_size=64, num_attention_heads=4))
        >>> cos, sin = rope(torch.arange(3))
        >>> cos.shape
        torch.Size([3, 16])
    """

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        params = rope_parameters_of(config)
        rope_type = params["rope_type"]
        head_dim = head_dim_of(config)
        # Built on the CPU explicitly: the loader constructs models under the meta device, and
        # inv_freq is a plain attribute (not a buffer) so `to_empty` leaves it intact.
        with torch.device("cpu"):
            if rope_type == "default":
                exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
                inv_freq, scaling = 1.0 / (params["rope_theta"] ** exponents), 1.0
            else:
                from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

                inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
            factors = getattr(config, "rope_freq_factors", None)
            if factors is not None:
                # A Llama 3.1+ GGUF stores its scaling as llama.cpp's per-frequency divisors (tensor rope_freqs).
                if len(factors) * 2 != head_dim:
                    raise ValueError(f"rope_freq_factors has {len(factors)} values, expected head_dim / 2 = {head_dim // 2}")
                inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float32)
        if inv_freq.numel() * 2 != head_dim:
            rotary_dim = inv_freq.numel() * 2
            raise ValueError(f"partial rotary embeddings are not supported (rotary dim {rotary_dim} != {head_dim})")
        self.inv_freq = inv_freq.float()
        self.attention_scaling = float(scaling)

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``[T, head_dim]`` in ``dtype``, for absolute ``positions`` ``[T]``.

        Computed per forward (once, shared by all layers) rather than read from a table sized to
        ``max_position_embeddings``: a few thousand multiplies, no 100k-row cache, and the
        values are exactly the reference's.
        """
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        # Scaled in float32, then cast to the activations' dtype, as the reference does.
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` — SwiGLU when the activation is SiLU."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = ACT2FN[hidden_act]
        self.silu = hidden_act == "silu"  # SwiGLU: the product runs fused (fused_elementwise)
        self.gate_up_proj: nn.Linear | None = None  # set by fuse()

    def fuse(self) -> None:
        """Replace gate/up_proj by one ``gate_up_proj`` (one matmul instead of two); quantized ones stay apart."""
        if not (type(self.gate_proj) is nn.Linear and type(self.up_proj) is nn.Linear):
            return
        self.gate_up_proj = fuse_linears((self.gate_proj, self.up_proj))
        del self.gate_proj, self.up_proj
        self.gate_proj = self.up_proj = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        gate_up = self.gate_up_proj(x)
        if self.silu:
            return self.down_proj(silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


def fuse_linears(linears: tuple[nn.Linear, ...]) -> nn.Linear:
    """One linear layer whose output is the concatenation of ``linears``' outputs.

        >>> a, b = nn.Linear(4, 2), nn.Linear(4, 3)
        >>> x = torch.randn(5, 4)
        >>> torch.allclose(fuse_linears((a, b))(x), torch.cat((a(x), b(x)), -1), atol=1e-6)
        True
    """
    first = linears[0]
    weight = torch.cat([lin.weight.detach() for lin in linears])
    fused = nn.Linear(first.in_features, weight.shape[0], bias=first.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(weight)
        if first.bias is not None:
            fused.bias.copy_(torch.cat([lin.bias.detach() for lin in linears]))
    fused.requires_grad_(False)
    return fused
