"""GPTQ and AWQ 4-bit checkpoints load into the ggml-block kernels without a dense copy of the model.

The folders are written here from the tiny random checkpoints, packed the way AutoGPTQ (v1: zeros stored
minus one) and AutoAWQ (GEMM: interleaved nibble order along the output) pack them; the reference weights
are computed in float64 from the packed tensors with transformers'/optimum's dequantization arithmetic.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import sglite
from sglite.runtime.kernels.quant_linear import QuantLinear, dequantize
from sglite.runtime.loading.gptq_awq import QuantizedCheckpointError
from sglite.runtime.loading.model_loader import load_model

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize(weight: np.ndarray, group: int, sym: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(codes [out, in], scales [groups, out], zeros [groups, out])`` the GPTQ/AWQ way (min/max per group)."""
    out_features, in_features = weight.shape
    group = in_features if group == -1 else group
    w = weight.astype(np.float64).reshape(out_features, -1, group)
    if sym:
        bound = np.abs(w).max(-1)
        scale = np.maximum(2 * bound / 15, 1e-8)
        zero = np.full_like(scale, 8.0)
    else:
        low, high = np.minimum(w.min(-1), 0), np.maximum(w.max(-1), 0)
        scale = np.maximum((high - low) / 15, 1e-8)
        zero = np.clip(np.round(-low / scale), 0, 15)
    scale = scale.astype(np.float16).astype(np.float64)
    codes = np.clip(np.round(w / scale[..., None]) + zero[..., None], 0, 15).astype(np.int64)
    return codes.reshape(out_features, in_features), scale.T.astype(np.float16), zero.T.astype(np.int64)


def pack_words(codes: np.ndarray, order: list[int] | None = None) -> np.ndarray:
    """8 nibbles along the last axis into one int32 word (nibble k holds item ``order[k]``)."""
    order = order or list(range(8))
    grouped = codes.reshape(*codes.shape[:-1], -1, 8)
    words = np.zeros(grouped.shape[:-1], dtype=np.int64)
    for k, item in enumerate(order):
        words |= (grouped[..., item] & 15) << (4 * k)
    return words.astype(np.uint32).view(np.int32)


def unpack_words(words: np.ndarray, order: list[int] | None = None) -> np.ndarray:
    order = order or list(range(8))
    w = words.view(np.uint32).astype(np.int64)
    out = np.zeros((*w.shape, 8), dtype=np.int64)
    for k, item in enumerate(order):
        out[..., item] = (w >> (4 * k)) & 15
    return out.reshape(*w.shape[:-1], -1)


def reference_weight(tensors: dict[str, torch.Tensor], prefix: str, method: str, group: int) -> np.ndarray:
    """float64 ``[out, in]`` from the packed tensors, as transformers/optimum dequantize them."""
    qweight, qzeros = tensors[f"{prefix}.qweight"].numpy(), tensors[f"{prefix}.qzeros"].numpy()
    scales = tensors[f"{prefix}.scales"].numpy().astype(np.float64)
    if method == "gptq":
        codes = unpack_words(qweight.T).T  # [in, out]: 8 inputs per word along dim 0
        zeros = unpack_words(qzeros) + 1  # v1 checkpoints store zero - 1
        g_idx = tensors[f"{prefix}.g_idx"].numpy()
        return (scales[g_idx] * (codes - zeros[g_idx])).T
    codes = unpack_words(qweight, AWQ_PACK_ORDER)  # [in, out]
    zeros = unpack_words(qzeros, AWQ_PACK_ORDER)
    g = np.arange(codes.shape[0]) // (codes.shape[0] if group == -1 else group)
    return ((codes - zeros[g]) * scales[g]).T


def write_quantized(hf_dir: Path, out: Path, method: str, group: int, sym: bool, **config_overrides) -> dict:
    """A GPTQ (v1) or AWQ (GEMM) folder of ``hf_dir``'s linear layers (lm_head stays dense)."""
    shutil.copytree(hf_dir, out)
    dense = load_file(str(hf_dir / "model.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for name, value in dense.items():
        prefix, _, kind = name.rpartition(".")
        if prefix.rpartition(".")[2] not in LINEARS or kind != "weight":
            tensors[name] = value
            continue
        codes, scales, zeros = quantize(value.float().numpy(), group, sym)
        in_features = codes.shape[1]
        if method == "gptq":
            tensors[f"{prefix}.qweight"] = torch.from_numpy(pack_words(codes).T.copy())  # [in / 8, out]
            tensors[f"{prefix}.qzeros"] = torch.from_numpy(pack_words(zeros - 1))
            tensors[f"{prefix}.g_idx"] = torch.arange(in_features, dtype=torch.int32) // (in_features if group == -1 else group)
        else:
            tensors[f"{prefix}.qweight"] = torch.from_numpy(pack_words(codes.T.copy(), AWQ_PACK_ORDER))  # [in, out / 8]
            tensors[f"{prefix}.qzeros"] = torch.from_numpy(pack_words(zeros, AWQ_PACK_ORDER))
        tensors[f"{prefix}.scales"] = torch.from_numpy(scales.copy())
    (out / "model.safetensors").unlink()
    save_file(tensors, str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    quant = ({"quant_method": "gptq", "bits": 4, "group_size": group, "sym": sym, "desc_act": False}
             if method == "gptq" else {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                        "version": "gemm"})
    config["quantization_config"] = {**quant, **config_overrides}
    (out / "config.json").write_text(json.dumps(config))
    return tensors


CASES = [("gptq", 32, True, "Q4_0"), ("gptq", 64, False, "Q4_1"), ("gptq", -1, True, "Q4_0"), ("awq", 32, False, "Q4_1"),
         ("awq", 128, False, "Q4_1")]


@pytest.mark.parametrize("method,group,sym,qtype", CASES, ids=[f"{m}-g{g}-{'sym' if s else 'asym'}" for m, g, s, _ in CASES])
def test_layers_are_repacked_to_the_reference_weights(method, group, sym, qtype, llama_path, tmp_path):
    from gguf import GGMLQuantizationType

    tensors = write_quantized(llama_path, tmp_path / "q", method, group, sym)
    model, _ = load_model(tmp_path / "q")
    layers = [(f"model.layers.{i}.{part}.{proj}", getattr(getattr(layer, part), proj))
              for i, layer in enumerate(model.model.layers)
              for part, projs in (("self_attn", LINEARS[:4]), ("mlp", LINEARS[4:])) for proj in projs]
    for prefix, layer in layers:
        assert isinstance(layer, QuantLinear) and layer.weight.qtype == GGMLQuantizationType[qtype], prefix
        want = reference_weight(tensors, prefix, method, group)
        got = dequantize(layer.weight).double().numpy()
        # Q4_0 is exact; Q4_1 rounds m = -scale * zero to float16
        tolerance = 1e-6 if qtype == "Q4_0" else 2e-3 * np.abs(want).max()
        assert np.abs(got - want).max() <= tolerance, prefix
    assert not isinstance(model.lm_head, QuantLinear)


@pytest.mark.parametrize("method,sym", [("gptq", True), ("awq", False)])
def test_generation_agrees_with_the_reference_weights(method, sym, llama_path, tmp_path):
    from transformers import AutoModelForCausalLM

    tensors = write_quantized(llama_path, tmp_path / "q", method, 32, sym)
    reference = AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in reference.named_parameters():
            prefix = name.removesuffix(".weight")
            if f"{prefix}.qweight" in tensors:
                param.copy_(torch.from_numpy(reference_weight(tensors, prefix, method, 32)))
    ids = torch.randint(0, 2048, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0].argmax(-1)
    with sglite.Engine(str(tmp_path / "q"), max_total_tokens=256) as engine:
        out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 1, "temperature": 0, "ignore_eos": True})
        assert isinstance(engine.runner.model.model.layers[0].mlp.down_proj, QuantLinear)
    assert out["output_ids"][0] == int(want[-1])
    from sglite.runtime.forward_batch import ForwardBatch
    from sglite.runtime.kv_pool import KVSlotPool

    model, _ = load_model(tmp_path / "q")
    pool = KVSlotPool(len(ids), model.num_layers, model.num_kv_heads, model.head_dim)
    slots = pool.alloc(len(ids))
    with torch.no_grad():
        got = model.compute_logits(model(ForwardBatch(torch.tensor(ids), torch.arange(len(ids)), slots, [0], [len(ids)],
                                                      [slots]), pool)).argmax(-1)
    assert (got == want).float().mean().item() >= 0.95


@pytest.mark.parametrize("overrides,message", [
    ({"desc_act": True}, "desc_act"),
    ({"bits": 3}, "bits = 3"),
    ({"group_size": 48}, "group_size = 48"),
    ({"quant_method": "bitsandbytes"}, "'bitsandbytes'"),
])
def test_unsupported_options_are_named(overrides, message, llama_path, tmp_path):
    write_quantized(llama_path, tmp_path / "q", "gptq", 32, True, **overrides)
    with pytest.raises((QuantizedCheckpointError, ValueError), match=message):
        sglite.Engine(str(tmp_path / "q"), max_total_tokens=64)
