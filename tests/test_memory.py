"""Memory estimates: hand-computed figures for real models, and parameter counts checked against transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from sglite.runtime.loading import memory
from sglite.runtime.loading.memory import (
    MemoryEstimate,
    dtype_size,
    estimate,
    format_estimate,
    kv_bytes_per_token,
    main_estimate,
    max_kv_tokens,
    param_count,
    pool_size_for,
    weight_bytes,
)

LLAMA2_7B = LlamaConfig(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    tie_word_embeddings=False,
)
LLAMA3_8B = LlamaConfig(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    tie_word_embeddings=False,
)


def test_llama2_7b_by_hand():
    assert param_count(LLAMA2_7B) == 6_738_415_616
    assert weight_bytes(LLAMA2_7B, 2) == 2 * 6_738_415_616
    assert kv_bytes_per_token(LLAMA2_7B, 2) == 524_288  # 0.5 MiB per token in fp16


def test_llama3_8b_gqa_by_hand():
    assert param_count(LLAMA3_8B) == 8_030_261_248
    assert kv_bytes_per_token(LLAMA3_8B, dtype_size("bfloat16")) == 131_072


def test_naive_kv_formula_overstates_gqa_by_heads_over_kv_heads():
    naive = 2 * LLAMA3_8B.num_hidden_layers * LLAMA3_8B.hidden_size * 2
    assert naive == 4 * kv_bytes_per_token(LLAMA3_8B, 2)
    # Without GQA the naive formula is exact.
    assert 2 * LLAMA2_7B.num_hidden_layers * LLAMA2_7B.hidden_size * 2 == kv_bytes_per_token(LLAMA2_7B, 2)


SMALL = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


@pytest.mark.parametrize(
    "family, extra",
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": True}),
        ("llama", {"attention_bias": True, "mlp_bias": True}),
        ("mistral", {"head_dim": 32}),
        ("qwen2", {}),
        ("qwen2", {"tie_word_embeddings": True}),
        ("qwen3", {"head_dim": 24}),  # qwen3 decouples head_dim from hidden / heads
        ("qwen3", {"head_dim": 16, "attention_bias": True, "tie_word_embeddings": True}),
    ],
)
def test_param_count_matches_transformers(family, extra):
    config = AutoConfig.for_model(family, **{"tie_word_embeddings": False, **SMALL, **extra})
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = AutoModelForCausalLM.from_config(config)
    assert param_count(config) == sum(p.numel() for p in model.parameters())
    head_dim = extra.get("head_dim", SMALL["hidden_size"] // SMALL["num_attention_heads"])
    assert kv_bytes_per_token(config, 4) == 2 * SMALL["num_hidden_layers"] * 2 * head_dim * 4


def test_kv_heads_default_to_attention_heads():
    config = LlamaConfig(**{**SMALL, "num_key_value_heads": None})
    assert kv_bytes_per_token(config, 2) == 2 * 2 * 4 * 16 * 2


def test_unsupported_model_type_is_named():
    config = AutoConfig.for_model("gpt2", n_layer=2, n_embd=64, n_head=4)
    with pytest.raises(ValueError, match="gpt2"):
        param_count(config)


def test_dtype_size():
    assert dtype_size("float32") == 4 and dtype_size(torch.bfloat16) == 2 and dtype_size("torch.float16") == 2
    with pytest.raises(ValueError, match="float8"):
        dtype_size("float8")


def test_estimate_adds_up():
    est = estimate(LLAMA2_7B, context=4096, batch=2, dtype="float16", overhead_fraction=0.1)
    assert isinstance(est, MemoryEstimate)
    assert est.kv_bytes == 524_288 * 4096 * 2 == 4 * 1024**3
    assert est.overhead_bytes == int(0.1 * (est.weight_bytes + est.kv_bytes))
    assert est.total_bytes == est.weight_bytes + est.kv_bytes + est.overhead_bytes
    table = format_estimate(est)
    assert "6.74 B params in float16" in table and "4.00 GiB" in table and "512.00 KiB" in table
    with pytest.raises(ValueError, match="positive"):
        estimate(LLAMA2_7B, context=0)


def test_max_kv_tokens_is_the_inverse_of_estimate():
    budget = 24 * 1024**3
    tokens = max_kv_tokens(LLAMA3_8B, budget, "bfloat16")
    assert tokens > 0
    assert estimate(LLAMA3_8B, context=tokens, dtype="bfloat16").total_bytes <= budget
    assert estimate(LLAMA3_8B, context=tokens + 1, dtype="bfloat16").total_bytes > budget
    assert max_kv_tokens(LLAMA3_8B, 1024**3, "bfloat16") == 0  # the weights alone do not fit


def test_pool_size_for_cpu():
    config = LlamaConfig(**SMALL, max_position_embeddings=512)
    assert pool_size_for(config, torch.float32, "cpu", requested=100) == 100
    with pytest.raises(ValueError, match="max_total_tokens"):
        pool_size_for(config, torch.float32, "cpu", requested=0)
    size = pool_size_for(config, torch.float32, "cpu")
    assert 0 < size <= memory.CPU_POOL_CONTEXTS * 512
    assert pool_size_for(config, torch.float32, "cpu", context_length=64) <= memory.CPU_POOL_CONTEXTS * 64


def test_pool_size_for_cpu_without_memory(monkeypatch):
    monkeypatch.setattr(memory, "available_host_memory", lambda: 0)
    with pytest.raises(MemoryError, match="max_total_tokens"):
        pool_size_for(LLAMA2_7B, "float16", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_pool_size_for_cuda():
    free, _ = torch.cuda.mem_get_info()
    size = pool_size_for(LLAMA3_8B, torch.bfloat16, "cuda")
    assert 0 < size * kv_bytes_per_token(LLAMA3_8B, 2) <= free


def test_cli_on_a_local_config(tmp_path, capsys):
    LLAMA2_7B.save_pretrained(tmp_path)
    assert main_estimate([str(tmp_path), "--context", "4096", "--dtype", "float16", "--memory-gb", "24"]) == 0
    out = capsys.readouterr().out
    assert "llama, 32 layers, 32/32 KV/query heads" in out
    assert "6.74 B params in float16" in out and "512.00 KiB" in out
    tokens = max_kv_tokens(LLAMA2_7B, 24 * 1024**3, "float16")
    assert f"in 24 GiB: {tokens} KV tokens" in out and "this estimate fits" in out


def test_cli_names_a_missing_model(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main_estimate(["sglite-tests/no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "sglite-tests/no-such-model" in err and "config.json" in err


def test_one_dtype_vocabulary_for_config_loader_and_estimate(llama_path):
    from sglite.runtime.config import EngineConfig
    from sglite.runtime.dtypes import dtype_name
    from sglite.runtime.loading.memory import dtype_size
    from sglite.runtime.loading.model_loader import resolve_dtype

    for alias, name in [("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32"), ("half", "float16")]:
        assert EngineConfig(dtype=alias).dtype == name == dtype_name(alias)
        assert resolve_dtype(alias, torch.device("cpu")) == getattr(torch, name)
        assert dtype_size(alias) == torch.empty(0, dtype=getattr(torch, name)).element_size()
    for where in (lambda: EngineConfig(dtype="int8"), lambda: resolve_dtype("int8", torch.device("cpu")), lambda: dtype_size("int8")):
        with pytest.raises(ValueError, match="unknown dtype 'int8'"):
            where()
