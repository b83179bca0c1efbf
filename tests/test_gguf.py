"""GGUF loading, on small GGUF files written here from the tiny random checkpoints with ``gguf.GGUFWriter``.

Each file is written the way llama.cpp's converter writes one (its tensor names, Q/K rows of the
llama family interleaved per head, quantized blocks), so the loader must undo all of it to get
the checkpoint back. The dense path (an explicit ``dtype``) must reproduce the checkpoint's tensors;
the default path must keep the file's blocks (views of the file, no dense weight) and compute the same.
Llama 3.1 ``rope_freqs`` must match transformers' llama3 RoPE; files of released models' shapes load and
decode; bad files are named before anything is allocated; peak memory stays near the file size.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, quants
from safetensors.torch import load_file
from torch import nn

import sglite
from sglite.runtime.forward_batch import ForwardBatch
from sglite.runtime.kernels.quant_linear import QuantEmbedding, QuantLinear
from sglite.runtime.kv_pool import KVSlotPool
from sglite.runtime.loading import gguf_loader
from sglite.runtime.loading.gguf_loader import GGUFNotFoundError, find_gguf, gguf_model_dir
from sglite.runtime.loading.gguf_model import load_gguf_model
from sglite.runtime.loading.gguf_metadata import (
    GGUFShapeError,
    open_gguf,
    UnsupportedGGUFArchitectureError,
    UnsupportedGGUFError,
    UnsupportedGGUFQuantizationError,
)
from sglite.runtime.loading.synthetic_gguf import SHAPES, llama3_rope_factors, write_synthetic_gguf

# Written from the GGUF side on purpose (the loader's table goes the other way).
TO_GGUF = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
PROMPTS = ["def fib(n):", "import os\nimport sys\n", "class A:\n    x = 1  5", "Hello  2024 world"]


def gguf_name(hf_name: str) -> str:
    globals_ = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
    if hf_name in globals_:
        return globals_[hf_name]
    layer, part, kind = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name).groups()
    return f"blk.{layer}.{TO_GGUF[part]}.{kind}"


def interleave_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's order: within each head, row i of the first half then row i of the second half."""
    first, second = np.split(rows.reshape(heads, rows.shape[0] // heads, *rows.shape[1:]), 2, axis=1)
    return np.stack([first, second], axis=2).reshape(rows.shape)


K_QUANT_LAYOUT = {Q.Q2_K: (84, (80, 82)), Q.Q3_K: (110, (108,)), Q.Q4_K: (144, (0, 2)), Q.Q5_K: (176, (0, 2)),
                  Q.Q6_K: (210, (208,))}
"""Bytes per 256-value block, and the offsets of its float16 scale fields (the rest is random bits)."""


def k_quant_blocks(rows: int, cols: int, qtype: Q, seed: int = 0) -> np.ndarray:
    """Random K-quant blocks (gguf has no K-quantizer) with small finite f16 scales."""
    block_bytes, scale_offsets = K_QUANT_LAYOUT[qtype]
    blocks = np.random.default_rng(seed).integers(0, 256, (rows, cols // 256, block_bytes), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    for offset in scale_offsets:
        blocks[..., offset:offset + 2] = scale
    return blocks.reshape(rows, -1)


def write_gguf(
    hf_dir: Path,
    out: Path,
    arch: str | None = None,
    types: dict[str, Q] | None = None,
    pre: str = "gpt2",
    extra_raw: dict[str, tuple[np.ndarray, Q]] | None = None,
    additional: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Write ``hf_dir`` as a GGUF file; return the float32 tensors (HF names and order) the loader must produce.

    ``types`` maps a regex over GGUF tensor names to the type to store them in (default F32);
    ``extra_raw`` replaces tensors by raw blocks of a type (K-quants, unsupported types);
    ``additional`` adds float32 tensors under GGUF names of their own.
    """
    config = json.loads((hf_dir / "config.json").read_text())
    arch = arch or config["model_type"]
    weights = {name: t.float().numpy() for name, t in load_file(str(hf_dir / "model.safetensors")).items()}
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = GGUFWriter(str(out), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    tokenizer = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda item: item[1])
    special = {added["id"] for added in tokenizer["added_tokens"] if added["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if index in special else 1 for _, index in vocab])
    writer.add_token_merges([" ".join(merge) for merge in tokenizer["model"]["merges"]])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_chat_template((hf_dir / "chat_template.jinja").read_text())

    expected = {}
    for name, values in weights.items():
        target = gguf_name(name)
        qtype = next((t for pattern, t in (types or {}).items() if re.search(pattern, target)), Q.F32)
        stored = values
        if arch == "llama" and ".q_proj." in name:
            stored = interleave_rows(values, heads)
        elif arch == "llama" and ".k_proj." in name:
            stored = interleave_rows(values, kv_heads)
        if target in (extra_raw or {}):
            raw, raw_type = extra_raw[target]
            writer.add_tensor(target, raw, raw_dtype=raw_type)
            # (only K-quants are expected to load; q/k tensors are never replaced, so no row order to undo)
            expected[name] = quants.dequantize(raw, raw_type) if raw_type in K_QUANT_LAYOUT else values
            continue
        if qtype == Q.F32:
            writer.add_tensor(target, stored)
            expected[name] = values
        else:
            writer.add_tensor(target, quants.quantize(stored, qtype), raw_dtype=qtype)
            # Quantization works within a row and the interleave moves whole rows, so they commute.
            expected[name] = quants.dequantize(quants.quantize(values, qtype), qtype)
    for target, values in (additional or {}).items():
        writer.add_tensor(target, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SGLITE_CACHE", str(root))
    return root


def loaded_weights(path: Path, dtype: str = "float32") -> dict[str, torch.Tensor]:
    """The dense path's parameters, by checkpoint name (before fusing)."""
    model, _ = load_gguf_model(path, dtype=dtype)
    return dict(model.state_dict())


def dense_weights(path: Path) -> dict[str, np.ndarray]:
    return {name: t.float().numpy() for name, t in loaded_weights(path).items()}


def test_llama_f32_round_trip_is_exact(llama_path, tmp_path, cache):
    expected = write_gguf(llama_path, tmp_path / "tiny.gguf")
    folder = gguf_model_dir(tmp_path / "tiny.gguf")
    assert folder.parent == cache
    assert not list(folder.glob("*.safetensors"))  # no weights on disk besides the file itself
    got = dense_weights(tmp_path / "tiny.gguf")
    assert got.keys() == expected.keys()
    for name, values in expected.items():
        assert np.array_equal(got[name], values), name  # Q/K rows restored, nothing else moved
    config, original = (json.loads((d / "config.json").read_text()) for d in (folder, llama_path))
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "rope_parameters",
                "tie_word_embeddings", "eos_token_id", "model_type"):
        assert config[key] == original[key], key
    assert config["rms_norm_eps"] == pytest.approx(original["rms_norm_eps"], rel=1e-6)  # GGUF stores float32
    assert (folder / "chat_template.jinja").read_text() == (llama_path / "chat_template.jinja").read_text()
    from transformers import AutoTokenizer

    mine, reference = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(llama_path)
    for text in PROMPTS + ["<|im_start|>user\nhi<|im_end|>"]:
        assert mine.encode(text) == reference.encode(text)


def test_engine_greedy_on_gguf_equals_the_checkpoint(llama_path, tmp_path, cache):
    write_gguf(llama_path, tmp_path / "tiny.gguf")
    params = {"max_new_tokens": 12, "temperature": 0}
    outputs = []
    for source in (llama_path, tmp_path, tmp_path / "tiny.gguf"):  # directory holding one .gguf, the file
        with sglite.Engine(str(source), max_total_tokens=512) as engine:
            outputs.append([out["output_ids"] for out in engine.generate(PROMPTS, params)])
    assert outputs[0] == outputs[1] == outputs[2]
    assert all(len(ids) == 12 for ids in outputs[0])


def test_quantized_types_dequantize_to_the_blocks_values(llama_path, tmp_path, cache):
    rows, cols = 128, 256  # ffn_down of the tiny model: [hidden, intermediate]
    types = {r"token_embd": Q.Q8_0, r"attn_q\.": Q.Q4_0, r"attn_k\.": Q.Q4_1, r"attn_v": Q.Q5_0,
             r"attn_output": Q.Q5_1, r"ffn_gate": Q.F16, r"ffn_up": Q.BF16}
    raw = {"blk.0.ffn_down.weight": (k_quant_blocks(rows, cols, Q.Q4_K), Q.Q4_K),
           "blk.1.ffn_down.weight": (k_quant_blocks(rows, cols, Q.Q6_K, seed=1), Q.Q6_K),
           "blk.2.ffn_down.weight": (k_quant_blocks(rows, cols, Q.Q2_K, seed=2), Q.Q2_K)}
    expected = write_gguf(llama_path, tmp_path / "q.gguf", types=types, extra_raw=raw)
    got = dense_weights(tmp_path / "q.gguf")
    for name, values in expected.items():
        assert got[name].shape == values.shape, name
        assert np.isfinite(values).all() and np.array_equal(got[name], values), name
    assert not np.array_equal(got["model.layers.0.self_attn.q_proj.weight"],
                              load_file(str(llama_path / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"].numpy())
    # F16/BF16 stay in their own exact dtype; dequantized blocks become float32
    # the default path keeps each tensor's own blocks, which dequantize to the same values
    from sglite.runtime.kernels.quant_linear import QuantEmbedding, QuantLinear, dequantize

    model, _ = load_gguf_model(tmp_path / "q.gguf")
    layer = model.model.layers[0]
    kept = {"model.embed_tokens.weight": (model.model.embed_tokens, QuantEmbedding, Q.Q8_0),
            "model.layers.0.self_attn.q_proj.weight": (layer.self_attn.q_proj, QuantLinear, Q.Q4_0),
            "model.layers.0.self_attn.k_proj.weight": (layer.self_attn.k_proj, QuantLinear, Q.Q4_1),
            "model.layers.0.self_attn.v_proj.weight": (layer.self_attn.v_proj, QuantLinear, Q.Q5_0),
            "model.layers.0.mlp.gate_proj.weight": (layer.mlp.gate_proj, QuantLinear, Q.F16),
            "model.layers.0.mlp.up_proj.weight": (layer.mlp.up_proj, QuantLinear, Q.BF16),
            "model.layers.0.mlp.down_proj.weight": (layer.mlp.down_proj, QuantLinear, Q.Q4_K),
            "model.layers.2.mlp.down_proj.weight": (model.model.layers[2].mlp.down_proj, QuantLinear, Q.Q2_K)}
    for name, (module, kind, qtype) in kept.items():
        assert type(module) is kind and module.weight.qtype == qtype, name
        assert np.array_equal(dequantize(module.weight).numpy(), expected[name]), name
    assert layer.input_layernorm.weight.dtype == torch.float32


@pytest.mark.parametrize("qtype", [Q.Q3_K, Q.Q5_K])
def test_other_k_quants_load(qtype, llama_path, tmp_path, cache):
    raw = {f"blk.{i}.ffn_down.weight": (k_quant_blocks(128, 256, qtype, seed=i), qtype) for i in range(3)}
    expected = write_gguf(llama_path, tmp_path / "k.gguf", extra_raw=raw)
    got = dense_weights(tmp_path / "k.gguf")
    assert all(np.isfinite(expected[name]).all() and np.array_equal(got[name], expected[name]) for name in expected)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_unpermuted_families_round_trip(family, tiny_model_factory, tmp_path, cache):
    hf_dir = tiny_model_factory(family)
    expected = write_gguf(hf_dir, tmp_path / f"{family}.gguf")
    folder = gguf_model_dir(tmp_path / f"{family}.gguf")
    got = dense_weights(tmp_path / f"{family}.gguf")
    assert got.keys() == expected.keys()
    assert all(np.array_equal(got[name], values) for name, values in expected.items())
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == family and config["architectures"] == [json.loads((hf_dir / "config.json").read_text())["architectures"][0]]


def test_digit_splitting_pre_tokenizer(llama_path, tmp_path, cache):
    """``tokenizer.ggml.pre = smollm`` isolates digits first: two spaces before a digit stay one ``ĠĠ`` token."""
    from transformers import AutoTokenizer

    write_gguf(llama_path, tmp_path / "gpt2.gguf", pre="gpt2")
    (tmp_path / "smol").mkdir()
    write_gguf(llama_path, tmp_path / "smol" / "smol.gguf", pre="smollm")
    plain = AutoTokenizer.from_pretrained(gguf_model_dir(tmp_path / "gpt2.gguf"))
    digits = AutoTokenizer.from_pretrained(gguf_model_dir(tmp_path / "smol"))
    original = AutoTokenizer.from_pretrained(llama_path)  # GPT-2 split, like pre = gpt2
    assert plain.encode("x  5") == original.encode("x  5")
    assert plain.convert_ids_to_tokens(plain.encode("x  5")) == ["x", "Ġ", "Ġ5"]
    assert digits.convert_ids_to_tokens(digits.encode("x  5")) == ["x", "ĠĠ", "5"]
    assert digits.convert_ids_to_tokens(digits.encode("x 12")) == ["x", "Ġ", "1", "2"]


def test_second_start_reuses_the_cache(llama_path, tmp_path, cache, monkeypatch):
    write_gguf(llama_path, tmp_path / "tiny.gguf")
    first = gguf_model_dir(tmp_path / "tiny.gguf")

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_loader, "write_gguf_folder", no_conversion)
    assert gguf_model_dir(tmp_path / "tiny.gguf") == first
    # a different file (here: other quantization) gets its own folder
    (tmp_path / "other").mkdir()
    write_gguf(llama_path, tmp_path / "other" / "tiny.gguf", types={"ffn_up": Q.Q8_0})
    with pytest.raises(AssertionError, match="converted again"):
        gguf_model_dir(tmp_path / "other" / "tiny.gguf")


def test_concurrent_conversions_agree(llama_path, tmp_path, cache):
    write_gguf(llama_path, tmp_path / "tiny.gguf")
    results, errors = [], []

    def convert():
        try:
            results.append(gguf_model_dir(tmp_path / "tiny.gguf"))
        except Exception as error:  # noqa: BLE001 - surfaced below
            errors.append(error)

    threads = [threading.Thread(target=convert) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(results)) == 1
    # no temporary folder left behind: the model's folder and its tokenizer's, converted once
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith("tokenizer-")) == [results[0].name]
    assert len([p for p in cache.iterdir() if p.name.startswith("tokenizer-")]) == 1
    assert (results[0] / "config.json").is_file() and not list(results[0].glob("*.safetensors"))


def test_unsupported_architecture_is_named(llama_path, tmp_path, cache):
    write_gguf(llama_path, tmp_path / "phi.gguf", arch="phi3")
    with pytest.raises(UnsupportedGGUFArchitectureError, match="'phi3'"):
        gguf_model_dir(tmp_path / "phi.gguf")
    assert not cache.exists() or not any(cache.iterdir())


def test_unsupported_quantization_is_named(llama_path, tmp_path, cache):
    rows, cols = 128, 256
    iq4 = np.random.default_rng(0).integers(0, 256, (rows, cols // 32 * 18), dtype=np.uint8)
    write_gguf(llama_path, tmp_path / "iq.gguf", extra_raw={"blk.2.ffn_down.weight": (iq4, Q.IQ4_NL)})
    with pytest.raises(UnsupportedGGUFQuantizationError, match=r"blk\.2\.ffn_down\.weight is stored as IQ4_NL"):
        sglite.Engine(str(tmp_path / "iq.gguf"))
    assert not cache.exists() or not any(cache.iterdir())  # checked before anything is written


def test_unknown_tensor_is_named(llama_path, tmp_path, cache):
    write_gguf(llama_path, tmp_path / "moe.gguf", additional={"blk.0.ffn_gate_exps.weight": np.zeros((2, 4), np.float32)})
    with pytest.raises(UnsupportedGGUFError, match="'blk.0.ffn_gate_exps.weight' has no Hugging Face equivalent"):
        gguf_model_dir(tmp_path / "moe.gguf")


def test_a_directory_must_hold_exactly_one_gguf(llama_path, tmp_path, cache):
    write_gguf(llama_path, tmp_path / "a.gguf")
    write_gguf(llama_path, tmp_path / "b.gguf")
    with pytest.raises(GGUFNotFoundError, match="found a.gguf, b.gguf"):
        sglite.Engine(str(tmp_path))
    with pytest.raises(GGUFNotFoundError, match="not a .gguf file"):
        find_gguf(llama_path / "config.json")


def test_estimate_reads_gguf_metadata(llama_path, tmp_path, cache, capsys):
    from sglite.runtime.loading.memory import main_estimate

    from gguf import GGUFReader

    from sglite.runtime.loading.memory import _human

    write_gguf(llama_path, tmp_path / "tiny.gguf", types=ALL_Q8)
    assert main_estimate([str(tmp_path / "tiny.gguf"), "--context", "1024"]) == 0
    out = capsys.readouterr().out
    params = sum(t.numel() for t in load_file(str(llama_path / "model.safetensors")).values())
    stored = sum(int(t.n_bytes) for t in GGUFReader(str(tmp_path / "tiny.gguf")).tensors)  # Q8_0 blocks + F32 norms
    weights_line = next(line for line in out.splitlines() if line.startswith("weights"))
    assert _human(stored) in weights_line and f"{params / 1e3:.2f} K params as stored" in weights_line
    assert "Q8_0" in weights_line and stored < params * 1.1  # ~1.06 bytes a weight, not float32's 4
    assert not cache.exists() or not any(cache.iterdir())  # no conversion just to estimate


def test_serve_and_runtime_default_to_sglite_model_then_the_packaged_gguf(tmp_path, monkeypatch, capsys):
    from sglite.runtime.loading.default_model import DEFAULT_GGUF_NAME, default_model_path
    from sglite.runtime.server.cli import main_serve

    missing = tmp_path / "nowhere.gguf"
    monkeypatch.setenv("SGLITE_MODEL", str(missing))
    assert main_serve([]) != 0  # no --model: $SGLITE_MODEL is what it tried to load
    assert f"cannot load model {str(missing)!r}" in capsys.readouterr().err
    monkeypatch.delenv("SGLITE_MODEL")
    assert Path(default_model_path()).name == DEFAULT_GGUF_NAME and Path(default_model_path()).is_file()


# ---- the default path: quantized blocks kept, read in place ----------------------------------------

ALL_Q8 = {r"token_embd|output\.weight|attn_|ffn_(gate|up|down)": Q.Q8_0}
ALL_Q4 = {r"token_embd|output\.weight|attn_(q|k|v|output)\.weight|ffn_(gate|up|down)": Q.Q4_0}


@torch.no_grad()
def teacher_forced_logits(model, ids: list[int]) -> torch.Tensor:
    """float32 logits ``[len(ids), vocab]`` of one prefill over ``ids`` (each row predicts the next token)."""
    pool = KVSlotPool(len(ids), model.num_layers, model.num_kv_heads, model.head_dim, dtype=model.dtype)
    slots = pool.alloc(len(ids))
    batch = ForwardBatch(torch.tensor(ids), torch.arange(len(ids)), slots, [0], [len(ids)], [slots])
    return model.compute_logits(model(batch, pool))


def token_ids(vocab: int, count: int = 96, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_default_path_reads_the_blocks_in_place(llama_path, tmp_path, cache):
    write_gguf(llama_path, tmp_path / "q8.gguf", types=ALL_Q8)
    reader = open_gguf(tmp_path / "q8.gguf")
    model, _ = load_gguf_model(tmp_path / "q8.gguf", reader=reader)
    start, end = reader.data.ctypes.data, reader.data.ctypes.data + len(reader.data)

    def in_file(module) -> bool:
        return start <= module.weight.data.data_ptr() < end

    layer = model.model.layers[0]
    assert not [name for name, m in model.named_modules() if type(m) in (nn.Linear, nn.Embedding)]  # no dense weight
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and in_file(model.model.embed_tokens)
    assert all(in_file(m) for m in (layer.self_attn.v_proj, layer.self_attn.o_proj, layer.mlp.down_proj, model.lm_head))
    assert not in_file(layer.self_attn.q_proj)  # llama.cpp's row order undone: a copy of q (and k) only
    model.fuse_projections()  # quantized projections stay apart (fusing would copy the file's blocks)
    assert isinstance(layer.self_attn.q_proj, QuantLinear) and layer.self_attn.qkv_proj is None


@pytest.mark.parametrize("family,types,overrides", [
    ("llama", ALL_Q8, {}),
    ("qwen2", ALL_Q4, {"tie_word_embeddings": True}),  # q/k/v biases stay dense; the head reads the embedding
])
def test_default_path_agrees_with_the_dense_path(family, types, overrides, tiny_model_factory, tmp_path, cache):
    hf_dir = tiny_model_factory(family, **overrides)
    write_gguf(hf_dir, tmp_path / "m.gguf", types=types)
    quantized, config = load_gguf_model(tmp_path / "m.gguf")
    dense, _ = load_gguf_model(tmp_path / "m.gguf", dtype="float32")
    if overrides.get("tie_word_embeddings"):
        assert quantized.lm_head.weight is quantized.model.embed_tokens.weight
        assert quantized.model.layers[0].self_attn.q_proj.bias is not None
    ids = token_ids(config.vocab_size)
    got, want = teacher_forced_logits(quantized, ids), teacher_forced_logits(dense, ids)
    agreement = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agreement >= 0.95, agreement
    assert (got - want).abs().max().item() < 0.05 * want.abs().max().item()


@pytest.mark.slow
def test_real_model_quantized_agrees_with_dense(real_model_path):
    """The embedded SmolLM2 Q4_1: next-token argmax of the default path vs the dense float32 path, teacher-forced."""
    from transformers import AutoTokenizer

    from sglite.runtime.loading.gguf_loader import find_gguf, gguf_model_dir

    path = find_gguf(real_model_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_model_dir(path))
    text = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
            "movable metal type, oil-based ink and a wooden press. Books became cheaper, literacy spread across "
            "Europe, and scientific ideas travelled faster than ever before. def fib(n):\n    return n if n < 2 "
            "else fib(n - 1) + fib(n - 2)\n")
    ids = tokenizer.encode(text)
    quantized, _ = load_gguf_model(path)
    dense, _ = load_gguf_model(path, dtype="float32")
    assert isinstance(quantized.model.layers[0].mlp.down_proj, QuantLinear)
    agreement = (teacher_forced_logits(quantized, ids).argmax(-1) == teacher_forced_logits(dense, ids).argmax(-1))
    assert agreement.float().mean().item() >= 0.95


def test_gguf_rope_freqs_match_transformers_llama3_rope(tiny_model_factory, tmp_path, cache):
    from transformers import AutoModelForCausalLM

    hf_dir = tiny_model_factory("llama", rope_scaling_llama3=True)
    config = json.loads((hf_dir / "config.json").read_text())
    rope = config.get("rope_parameters") or config["rope_scaling"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    factors = llama3_rope_factors(head_dim, rope["rope_theta"], (rope["factor"], rope["low_freq_factor"],
                                  rope["high_freq_factor"], rope["original_max_position_embeddings"]))
    write_gguf(hf_dir, tmp_path / "l3.gguf", additional={"rope_freqs.weight": factors})
    (tmp_path / "plain").mkdir()
    write_gguf(hf_dir, tmp_path / "plain" / "l3.gguf")  # the same weights without rope_freqs
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = token_ids(config["vocab_size"], count=300)
    with torch.inference_mode():
        want = reference(torch.tensor([ids])).logits[0]
    ours, ours_config = load_gguf_model(tmp_path / "l3.gguf", dtype="float32")
    assert ours_config.rope_freq_factors == pytest.approx(factors.tolist())
    got = teacher_forced_logits(ours, ids)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert (got - want).abs().max().item() < 1e-3
    unscaled = teacher_forced_logits(load_gguf_model(tmp_path / "plain" / "l3.gguf", dtype="float32")[0], ids)
    assert (unscaled - want).abs().max().item() > 1e-2  # the factors matter at these positions


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_released_shapes_load_and_decode(name, tmp_path, cache):
    shape = SHAPES[name]
    path = write_synthetic_gguf(shape, tmp_path / f"{name}.gguf", qtype="Q4_0", num_layers=1)
    with sglite.Engine(str(path), max_total_tokens=64) as engine:
        config, model = engine.model_config, engine.runner.model
        assert (config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads,
                config.vocab_size) == (shape.hidden_size, shape.intermediate_size, shape.num_attention_heads,
                                       shape.num_key_value_heads, shape.vocab_size)
        assert config.tie_word_embeddings == shape.tie_word_embeddings
        assert (getattr(config, "rope_freq_factors", None) is not None) == (shape.llama3_rope is not None)
        assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == shape.tie_word_embeddings
        out = engine.generate("Hello, my name is", {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True})
        assert len(out["output_ids"]) == 3 and all(0 <= t < shape.vocab_size for t in out["output_ids"])


def test_truncated_file_names_the_tensor(llama_path, tmp_path, cache):
    path = tmp_path / "cut.gguf"
    write_gguf(llama_path, path, types=ALL_Q8)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(GGUFShapeError, match=r"GGUF tensor \S+ ends at byte \d+ but the file has \d+ bytes: the file is truncated"):
        sglite.Engine(str(path))
    path.write_bytes(data[:100])  # cut inside the metadata
    with pytest.raises(GGUFShapeError, match="truncated"):
        sglite.Engine(str(path))
    assert not cache.exists() or not any(cache.iterdir())


def test_unknown_ggml_type_is_named(llama_path, tmp_path, cache):
    path = tmp_path / "odd.gguf"
    write_gguf(llama_path, path)
    data = bytearray(path.read_bytes())
    name = b"blk.0.ffn_down.weight"
    type_at = data.index(name) + len(name) + 4 + 2 * 8  # after the name: n_dims (u32), two dims (u64), then the type
    data[type_at:type_at + 4] = (999).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFShapeError, match=r"GGUF tensor blk\.0\.ffn_down\.weight has unknown ggml type 999"):
        sglite.Engine(str(path))
    assert not cache.exists() or not any(cache.iterdir())


def test_shape_disagreeing_with_metadata_is_named(llama_path, tmp_path, cache):
    bad = np.zeros((128, 224), dtype=np.float32)  # ffn_down is [hidden 128, intermediate 256]
    write_gguf(llama_path, tmp_path / "bad.gguf", extra_raw={"blk.1.ffn_down.weight": (bad, Q.F32)})
    with pytest.raises(GGUFShapeError, match=r"blk\.1\.ffn_down\.weight has shape \(128, 224\), but the file's metadata implies \(128, 256\)"):
        sglite.Engine(str(tmp_path / "bad.gguf"))
    assert not cache.exists() or not any(cache.iterdir())


MEMORY_PROBE = textwrap.dedent("""
    import json, os, sys
    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    import torch, sglite
    from sglite.runtime.kernels.quant_linear import quant_matmul  # libraries loaded before the baseline
    path, dtype = sys.argv[1], (sys.argv[2] if sys.argv[2] != "none" else None)
    baseline = rss("VmRSS:")
    with sglite.Engine(path, max_total_tokens=256, dtype=dtype) as engine:
        engine.generate("Hello there, how are you?", {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True})
        kv = engine.pool.kv.numel() * engine.pool.kv.element_size()
    print(json.dumps({"baseline": baseline, "peak": rss("VmHWM:"), "kv": kv}))
""")


@pytest.mark.slow
def test_peak_memory_grows_with_the_file_not_the_dense_model(tmp_path, cache):
    """TinyLlama-shape Q4_0 files of 2 and 8 layers, loaded and decoded in fresh processes: the extra peak RSS of
    the 6 extra layers is within 1.3x their bytes in the file (interpreter, libraries and activations cancel
    out); the dense float32 path's is above 4x (what the default path avoids)."""
    paths = {n: write_synthetic_gguf(SHAPES["tinyllama-1.1b"], tmp_path / f"tl{n}.gguf", qtype="Q4_0", num_layers=n)
             for n in (2, 8)}
    for path in paths.values():
        sglite.Engine(str(path), max_total_tokens=8).shutdown()  # the tokenizer folders, written outside the probes

    def peak(path, dtype: str) -> int:
        done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path), dtype], capture_output=True, text=True,
                              timeout=600, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])["peak"]

    extra_file = paths[8].stat().st_size - paths[2].stat().st_size
    quantized = peak(paths[8], "none") - peak(paths[2], "none")
    assert quantized <= 1.3 * extra_file, (quantized, extra_file)
    dense = peak(paths[8], "float32") - peak(paths[2], "float32")
    assert dense > 4 * extra_file, (dense, extra_file)
