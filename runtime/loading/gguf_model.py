"""Build a native model straight from a GGUF file, its quantized blocks kept as the file stores them.

The default (``dtype=None``) never makes a dense copy of the model: the skeleton is built on the meta
device, every quantized linear layer becomes a :class:`~sglite.runtime.kernels.quant_linear.QuantLinear`
over a read-only view of the memory-mapped file (only llama's Q/K tensors are copied, to restore HF's
row order), the token embedding a :class:`~sglite.runtime.kernels.quant_linear.QuantEmbedding` that
dequantizes only the looked-up rows, and a tied output head multiplies by the embedding's own blocks.
Norms, biases and other float tensors become dense float32. Activations are float32.

An explicit ``dtype`` (``"float32"``, ``"bfloat16"``) instead dequantizes every tensor into a dense model of
that dtype, one tensor at a time: the exact path that float32 comparisons with transformers use.

    >>> model, config = load_gguf_model("SmolLM2-135M-Instruct.Q4_1.gguf")          # doctest: +SKIP
    >>> type(model.model.layers[0].mlp.down_proj).__name__                          # doctest: +SKIP
    'QuantLinear'
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from sglite.runtime.loading.gguf_metadata import (
    ROPE_FREQS_TENSOR,
    GGUFShapeError,
    architecture_of,
    hf_config_from_gguf,
    open_gguf,
)
from sglite.runtime.loading.gguf_tensors import check_type, hf_name, hf_tensors, unpermute_rows
from sglite.runtime.models import get_model_class

if TYPE_CHECKING:
    from sglite.runtime.loading.gguf_file import GGUFFile as GGUFReader, GGUFTensor as ReaderTensor
    from transformers import PretrainedConfig

    from sglite.runtime.kernels.quant_linear import QuantizedTensor
    from sglite.runtime.models.llama import LlamaForCausalLM


def _expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape, for every parameter a checkpoint must provide (meta model)."""
    return {name: tuple(param.shape) for name, param in model.named_parameters()}


def check_tensors(reader: GGUFReader, model: nn.Module) -> dict[str, ReaderTensor]:
    """Every GGUF tensor by its HF name, after checking names, types and shapes against ``model`` (on meta).

    Runs before any weight is allocated, so a bad file fails fast and names the tensor.
    """
    expected = _expected_shapes(model)
    tied = bool(getattr(model, "tied_embeddings", False))
    by_name: dict[str, ReaderTensor] = {}
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS_TENSOR:
            continue  # read into the config (hf_config_from_gguf)
        name = hf_name(tensor.name)
        if tied and name == "lm_head.weight":
            continue
        check_type(tensor)
        shape = tuple(int(d) for d in reversed(tensor.shape))
        want = expected.get(name)
        if want is None:
            raise GGUFShapeError(f"GGUF tensor {tensor.name} ({name}) is not part of the {type(model).__name__} its metadata describes")
        if shape != want:
            raise GGUFShapeError(
                f"GGUF tensor {tensor.name} has shape {shape}, but the file's metadata implies {want}; the file is corrupt"
            )
        by_name[name] = tensor
    missing = sorted(set(expected) - set(by_name))
    if missing:
        raise GGUFShapeError(f"GGUF file lacks tensors the metadata implies: {', '.join(missing[:8])}")
    return by_name


def _view(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``array``'s memory (a read-only view of the memory-mapped file: no copy)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _dense(tensor: ReaderTensor) -> torch.Tensor:
    """A small float tensor (norm, bias, float32 weight) as a float32 copy in HF's ``[out, in]`` order."""
    from sglite.runtime.loading.gguf_tensors import dequantize

    return torch.from_numpy(dequantize(tensor))


def quantized_tensor(tensor: ReaderTensor, permute_heads: int | None = None) -> QuantizedTensor:
    """The blocks of a 2-D GGUF tensor as a :class:`QuantizedTensor` (a view of the file unless
    ``permute_heads`` asks for llama.cpp's Q/K rows to be put back in HF order, which copies)."""
    from gguf import GGMLQuantizationType

    from sglite.runtime.kernels.quant_linear import QuantizedTensor

    rows, cols = (int(d) for d in reversed(tensor.shape))
    data = tensor.data.reshape(rows, -1)
    if tensor.tensor_type in (GGMLQuantizationType.F16, GGMLQuantizationType.F32):
        data = data.view(np.uint8)  # float rows as their bytes, the kernels' layout for F16/F32
    if permute_heads is not None:
        data = unpermute_rows(data, permute_heads)
    return QuantizedTensor(_view(data), int(tensor.tensor_type), (rows, cols))


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _fill_quantized(model: LlamaForCausalLM, config: PretrainedConfig, tensors: dict[str, ReaderTensor], permuted_qk: bool) -> None:
    """Replace the meta model's layers by ones over the file's blocks; small tensors become dense float32."""
    from gguf import GGMLQuantizationType

    from sglite.runtime.kernels.quant_linear import QuantEmbedding, QuantLinear

    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    modules = dict(model.named_modules())
    for module_name, module in modules.items():
        if isinstance(module, nn.Linear) and not (module_name == "lm_head" and model.tied_embeddings):
            weight = tensors[f"{module_name}.weight"]
            bias_tensor = tensors.get(f"{module_name}.bias")
            proj = module_name.rpartition(".")[2]
            permute = heads[proj] if permuted_qk and proj in heads else None
            bias = None if bias_tensor is None else _dense(bias_tensor)
            if bias is not None and permute is not None:
                bias = torch.from_numpy(unpermute_rows(bias.numpy(), permute))
            if weight.tensor_type == GGMLQuantizationType.F32:
                layer = nn.Linear(module.in_features, module.out_features, bias=bias is not None)
                rows = unpermute_rows(weight.data, permute) if permute else weight.data
                layer.weight = nn.Parameter(_view(np.ascontiguousarray(rows)), requires_grad=False)
                if bias is not None:
                    layer.bias = nn.Parameter(bias, requires_grad=False)
            else:
                layer = QuantLinear(quantized_tensor(weight, permute), bias)
            _set_module(model, module_name, layer)
        elif isinstance(module, nn.Embedding):
            weight = tensors[f"{module_name}.weight"]
            if weight.tensor_type == GGMLQuantizationType.F32:
                layer = nn.Embedding.from_pretrained(_dense(weight), freeze=True)
            else:
                layer = QuantEmbedding(quantized_tensor(weight))
            _set_module(model, module_name, layer)
    embedding = model.model.embed_tokens
    if model.tied_embeddings:  # the head multiplies by the embedding's own blocks (no second copy)
        head = QuantLinear(embedding.weight) if isinstance(embedding, QuantEmbedding) else nn.Linear(
            embedding.embedding_dim, embedding.num_embeddings, bias=False)
        if isinstance(head, nn.Linear):
            head.weight = embedding.weight
        model.lm_head = head
    for name, param in list(model.named_parameters()):
        if param.device.type == "meta":  # norms (and any other small float parameter)
            _set_param(model, name, nn.Parameter(_dense(tensors[name]).reshape(param.shape), requires_grad=False))


def _set_param(model: nn.Module, name: str, param: nn.Parameter) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, param)


@torch.no_grad()
def _fill_dense(model: LlamaForCausalLM, reader: GGUFReader, config: PretrainedConfig, permuted_qk: bool) -> None:
    params = dict(model.named_parameters())
    arch_spec = architecture_of(reader)[1]
    for name, tensor in hf_tensors(reader, arch_spec, config.num_attention_heads, config.num_key_value_heads):
        if name in params:  # a tied head's lm_head.weight is not a separate parameter
            params[name].copy_(tensor)


def load_gguf_model(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    reader: GGUFReader | None = None,
) -> tuple[LlamaForCausalLM, PretrainedConfig]:
    """The native model of a GGUF file: quantized blocks kept (``dtype`` None or ``"auto"`` on CPU) or
    dequantized into dense ``dtype`` weights. Returns ``(model, hf_config)`` in eval mode."""
    from sglite.runtime.dtypes import resolve_dtype

    reader = reader if reader is not None else open_gguf(path)
    _, spec = architecture_of(reader)
    config = hf_config_from_gguf(reader)
    device = torch.device(device)
    quantized = dtype in (None, "auto") and device.type == "cpu"
    with torch.device("meta"):
        model = get_model_class(config)(config)
    tensors = check_tensors(reader, model)  # names, types and shapes, before any allocation
    if quantized:
        _fill_quantized(model, config, tensors, spec.permuted_qk)
    else:
        model = model.to(resolve_dtype(dtype, device))
        model.to_empty(device=device)
        model.tie_weights()
        _fill_dense(model, reader, config, spec.permuted_qk)
    model.eval().requires_grad_(False)
    return model, config


def quantized_weight_bytes(model: nn.Module) -> int:
    """Bytes of the quantized blocks a model holds (each shared tensor counted once)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        nbytes = getattr(module, "weight_bytes", None)
        if nbytes is not None and not isinstance(weight, torch.Tensor):
            seen[id(weight)] = int(nbytes)
    return sum(seen.values())
