"""GPTQ and AWQ 4-bit checkpoints, repacked at load into the ggml blocks the quantized kernels read.

Both store, per linear layer, 4-bit codes ``q``, a float16 scale ``s`` and a 4-bit zero ``z`` per group of
``group_size`` inputs, and mean ``w = s * (q - z)``. Each group is a whole number of ggml's 32-value blocks,
so a layer becomes, block by block, without ever holding its dense weight:

- symmetric GPTQ (every zero 8): ``Q4_0``, ``w = d * (q - 8)`` with ``d = s`` (exact);
- otherwise (asymmetric GPTQ, AWQ): ``Q4_1``, ``w = d * q + m`` with ``d = s``, ``m = -s * z`` (``m`` rounded to float16).

Layouts (AutoGPTQ / AutoAWQ, as transformers and optimum read them):

- GPTQ: ``qweight`` int32 ``[in / 8, out]`` (8 codes along the input, lowest nibble first), ``qzeros`` int32
  ``[groups, out / 8]`` (along the output), ``scales`` ``[groups, out]``, ``g_idx``; ``checkpoint_format``
  ``gptq`` (v1, the default) stores ``z - 1``, ``gptq_v2`` stores ``z``.
- AWQ (GEMM): ``qweight`` int32 ``[in, out / 8]`` and ``qzeros`` ``[groups, out / 8]``, both along the output
  in AutoAWQ's interleaved nibble order (:data:`AWQ_ORDER`), ``scales`` ``[groups, out]``.

    >>> model, config = load_model("TheBloke/Llama-2-7B-GPTQ")      # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

GGML_BLOCK = 32
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""AutoAWQ packs output ``8c + AWQ_ORDER[i]`` into nibble ``i`` of word ``c``."""
SUPPORTED_METHODS = ("gptq", "awq")


class QuantizedCheckpointError(ValueError):
    """A GPTQ/AWQ checkpoint option or tensor sglite cannot load (the message names it)."""


def quantization_settings(config: PretrainedConfig) -> dict | None:
    """The checked ``quantization_config`` of a GPTQ/AWQ checkpoint, or None for an unquantized one.

    Raises :class:`QuantizedCheckpointError` naming the option for anything but 4-bit, desc_act off,
    a group size that is a multiple of 32 (or -1: one group per row), and AWQ's GEMM layout.
    """
    quant = getattr(config, "quantization_config", None)
    if not quant:
        return None
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    method = str(quant.get("quant_method", "")).lower()
    if method not in SUPPORTED_METHODS:
        raise QuantizedCheckpointError(
            f"quantization_config.quant_method {method!r} is not supported; sglite loads {', '.join(SUPPORTED_METHODS)} checkpoints"
        )
    bits = quant.get("bits", quant.get("w_bit"))
    if bits != 4:
        raise QuantizedCheckpointError(f"quantization_config.bits = {bits}: sglite loads 4-bit {method} checkpoints only")
    if quant.get("desc_act"):
        raise QuantizedCheckpointError(
            "quantization_config.desc_act = true (act-order) is not supported: its groups are not contiguous blocks; "
            "use a checkpoint quantized with desc_act=false"
        )
    group = int(quant.get("group_size", quant.get("q_group_size", 128)))
    if group != -1 and (group <= 0 or group % GGML_BLOCK):
        raise QuantizedCheckpointError(
            f"quantization_config.group_size = {group}: it must be a multiple of {GGML_BLOCK} (or -1)"
        )
    version = str(quant.get("version", "gemm")).lower()
    if method == "awq" and version != "gemm":
        raise QuantizedCheckpointError(f"quantization_config.version = {version!r}: sglite loads AWQ GEMM checkpoints only")
    v1 = method == "gptq" and str(quant.get("checkpoint_format", "gptq")).lower() != "gptq_v2"
    return {"method": method, "group_size": group, "zero_minus_one": v1}


def _nibbles(words: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words -> their 8 nibbles (lowest first), as a new axis after ``dim`` merged into it."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    view = [1] * (words.dim() + 1)
    view[dim + 1] = 8
    codes = (words.unsqueeze(dim + 1) >> shifts.view(view)) & 15
    shape = list(words.shape)
    shape[dim] *= 8
    return codes.reshape(shape).to(torch.uint8)


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, zero_minus_one: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes uint8 [out, in], zeros int [groups, out])`` of a GPTQ layer."""
    codes = _nibbles(qweight, 0).t()
    zeros = _nibbles(qzeros, 1).to(torch.int32)
    return codes, zeros + 1 if zero_minus_one else zeros


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes uint8 [out, in], zeros int [groups, out])`` of an AWQ GEMM layer."""
    reverse = torch.tensor([AWQ_ORDER.index(i) for i in range(8)])

    def along_output(words: torch.Tensor) -> torch.Tensor:
        nib = _nibbles(words, 1).view(words.shape[0], -1, 8)
        return nib[:, :, reverse].reshape(words.shape[0], -1)

    return along_output(qweight).t(), along_output(qzeros).to(torch.int32)


def ggml_blocks(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """``(uint8 [out, in / 32 * bytes], qtype)``: Q4_0 when every zero is 8, else Q4_1."""
    from gguf import GGMLQuantizationType

    out_features, in_features = codes.shape
    per_group = (in_features if group_size == -1 else group_size) // GGML_BLOCK
    d = scales.t().to(torch.float32).repeat_interleave(per_group, dim=1)  # [out, blocks]
    z = zeros.t().repeat_interleave(per_group, dim=1)
    q = codes.view(out_features, -1, GGML_BLOCK)
    packed = q[..., :16] | (q[..., 16:] << 4)  # ggml: byte j holds values j and j + 16
    d16 = d.to(torch.float16).contiguous().view(torch.uint8).view(out_features, -1, 2)
    if bool((z == 8).all()):
        blocks, qtype = torch.cat((d16, packed), dim=-1), GGMLQuantizationType.Q4_0
    else:
        m16 = (-d * z).to(torch.float16).contiguous().view(torch.uint8).view(out_features, -1, 2)
        blocks, qtype = torch.cat((d16, m16, packed), dim=-1), GGMLQuantizationType.Q4_1
    return blocks.reshape(out_features, -1).contiguous(), int(qtype)


def load_quantized_checkpoint(model: nn.Module, files: list[Path], settings: dict) -> None:
    """Fill the meta-device ``model``: every linear layer the checkpoint quantized becomes a
    :class:`~sglite.runtime.kernels.quant_linear.QuantLinear` over repacked blocks, the rest dense float32."""
    from safetensors import safe_open

    from sglite.runtime.kernels.quant_linear import QuantizedTensor, QuantLinear
    from sglite.runtime.loading.weight_names import IGNORED_WEIGHT_SUFFIXES, WeightMismatchError

    handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    where = {name: handle for handle in handles for name in handle.keys()}
    group = settings["group_size"]
    for module_name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or f"{module_name}.qweight" not in where:
            continue
        get = lambda suffix: where[f"{module_name}.{suffix}"].get_tensor(f"{module_name}.{suffix}")  # noqa: E731
        out_features, in_features = module.out_features, module.in_features
        groups = 1 if group == -1 else in_features // group
        scales = get("scales")
        if in_features % GGML_BLOCK or (group != -1 and in_features % group) or tuple(scales.shape) != (groups, out_features):
            raise WeightMismatchError(
                f"{module_name}.scales has shape {tuple(scales.shape)}; a {out_features}x{in_features} layer with "
                f"group_size {group} needs ({groups}, {out_features})"
            )
        if f"{module_name}.g_idx" in where and group != -1:
            expected = torch.arange(in_features) // group
            if not torch.equal(get("g_idx").to(torch.int64), expected):
                raise QuantizedCheckpointError(
                    f"{module_name}.g_idx is not input // group_size (act-order groups): not supported, desc_act must be off"
                )
        if settings["method"] == "gptq":
            codes, zeros = unpack_gptq(get("qweight"), get("qzeros"), settings["zero_minus_one"])
        else:
            codes, zeros = unpack_awq(get("qweight"), get("qzeros"))
        if tuple(codes.shape) != (out_features, in_features):
            raise WeightMismatchError(f"{module_name}.qweight unpacks to {tuple(codes.shape)}, expected {(out_features, in_features)}")
        blocks, qtype = ggml_blocks(codes, scales, zeros, group)
        bias = where[f"{module_name}.bias"].get_tensor(f"{module_name}.bias") if f"{module_name}.bias" in where else None
        parent, _, attr = module_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr,
                QuantLinear(QuantizedTensor(blocks, qtype, (out_features, in_features)), bias))
    if getattr(model, "tied_embeddings", False):
        model.tie_weights()
    params = dict(model.named_parameters())
    for name, param in params.items():
        if param.device.type != "meta":
            continue
        if name not in where:
            raise WeightMismatchError(f"checkpoint does not match its config: {name} is missing")
        tensor = where[name].get_tensor(name).to(torch.float32)
        if tuple(tensor.shape) != tuple(param.shape):
            raise WeightMismatchError(f"{name} has shape {tuple(tensor.shape)}, the config implies {tuple(param.shape)}")
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, nn.Parameter(tensor, requires_grad=False))
    if getattr(model, "tied_embeddings", False):
        model.tie_weights()
    unused = [n for n in where if not n.endswith(IGNORED_WEIGHT_SUFFIXES) and n.rpartition(".")[0] not in dict(model.named_modules())]
    if unused:
        raise WeightMismatchError(f"checkpoint tensors not part of the architecture: {', '.join(sorted(unused)[:8])}")
