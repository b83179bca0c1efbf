"""Native models over the KV slot pool agree with transformers, and the loader finds checkpoints offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config

from sglite.runtime.kv_pool import KVSlotPool
from sglite.runtime.forward_batch import ForwardBatch
from sglite.runtime.loading.model_loader import (
    ModelNotFoundError,
    WeightMismatchError,
    load_model,
    resolve_model_path,
)
from sglite.runtime.models import UnsupportedModelError, get_model_class, supported_model_types

CASES = {
    "llama": ("llama", "bpe", {}),
    "mistral": ("mistral", "bpe", {}),
    "qwen2": ("qwen2", "bpe", {}),
    "qwen3": ("qwen3", "bpe", {}),
    "llama-rope-llama3": ("llama", "bpe", {"rope_scaling_llama3": True}),
    "llama-tied": ("llama", "bpe", {"tie_word_embeddings": True}),
    "qwen2-sentencepiece": ("qwen2", "sentencepiece", {}),
}
PROMPTS = (
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
    "The quick brown fox jumps over the lazy dog.",
    '{"name": "Alice", "age": 31}',
)
TOLERANCE = 1e-4
# Other batch shapes pick other float32 GEMM kernels; with logits of magnitude ~25 (wide random
# weights) that alone moves them by ~2e-4 — transformers' own cached forward differs from its full
# forward by as much. Shape-changing comparisons use this bound and also demand equal argmax.
SHAPE_TOLERANCE = 1e-3


class Checkpoint:
    """One tiny checkpoint loaded twice: natively and as the transformers reference."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.model, self.config = load_model(path)
        self.reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        self.prompts = [tokenizer.encode(text) for text in PROMPTS]

    def pool(self, size: int = 256) -> KVSlotPool:
        m = self.model
        return KVSlotPool(size, m.num_layers, m.num_kv_heads, m.head_dim, dtype=m.dtype)

    @torch.inference_mode()
    def reference_logits(self, ids: list[int]) -> torch.Tensor:
        return self.reference(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module")
def checkpoints(tiny_model_factory):
    loaded: dict[str, Checkpoint] = {}

    def get(case: str) -> Checkpoint:
        if case not in loaded:
            family, tokenizer, overrides = CASES[case]
            loaded[case] = Checkpoint(tiny_model_factory(family, tokenizer, **overrides))
        return loaded[case]

    return get


@torch.inference_mode()
def run(model, pool: KVSlotPool, requests: list[tuple[list[int], int, torch.Tensor]]) -> list[torch.Tensor]:
    """Forward ``(new_ids, prefix_len, kv_slots)`` requests as one ragged batch; logits per request."""
    ids, positions, out_slots = [], [], []
    for new_ids, prefix_len, slots in requests:
        ids += new_ids
        positions += range(prefix_len, prefix_len + len(new_ids))
        out_slots.append(slots[prefix_len : prefix_len + len(new_ids)])
    batch = ForwardBatch(
        input_ids=torch.tensor(ids),
        positions=torch.tensor(positions),
        out_slots=torch.cat(out_slots),
        prefix_lens=[r[1] for r in requests],
        extend_lens=[len(r[0]) for r in requests],
        kv_slots=[r[2][: r[1] + len(r[0])] for r in requests],
    )
    logits = model.compute_logits(model(batch, pool))
    assert logits.dtype == torch.float32 and logits.shape == (len(ids), model.vocab_size)
    return list(logits.split(batch.extend_lens))


# max_position_embeddings (2048) / original_max_position_embeddings = factor, as YaRN expects.
YARN_ROPE = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "rope_theta": 10000.0}


def assert_same_predictions(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=SHAPE_TOLERANCE, rtol=0)
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("case", CASES)
def test_prefill_logits_match_transformers(checkpoints, case):
    ckpt = checkpoints(case)
    ids = ckpt.prompts[0]
    pool = ckpt.pool()
    slots = pool.alloc(len(ids))
    (logits,) = run(ckpt.model, pool, [(ids, 0, slots)])
    torch.testing.assert_close(logits, ckpt.reference_logits(ids), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_ragged_batch_equals_each_sequence_alone(checkpoints, case):
    ckpt = checkpoints(case)
    pool = ckpt.pool()
    assert len({len(p) for p in ckpt.prompts}) == 3, "prompts must differ in length"
    alone = []
    for ids in ckpt.prompts:
        (logits,) = run(ckpt.model, pool, [(ids, 0, pool.alloc(len(ids)))])
        alone.append(logits)
    together = run(ckpt.model, pool, [(ids, 0, pool.alloc(len(ids))) for ids in ckpt.prompts])
    for a, b in zip(alone, together):
        assert_same_predictions(b, a)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.slow
def test_extend_over_cached_prefix(checkpoints, case):
    ckpt = checkpoints(case)
    ids = ckpt.prompts[0]
    assert len(ids) > 9
    pool = ckpt.pool()
    slots = pool.alloc(len(ids))
    run(ckpt.model, pool, [(ids[:7], 0, slots)])
    # A second sequence in the same batch has no prefix: mixed prefix lengths in one forward.
    other = ckpt.prompts[1]
    extended, _ = run(ckpt.model, pool, [(ids[7:], 7, slots), (other, 0, pool.alloc(len(other)))])
    full = ckpt.reference_logits(ids)
    assert_same_predictions(extended, full[7:])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.slow
def test_batched_greedy_decode_matches_generate(checkpoints, case):
    ckpt = checkpoints(case)
    steps = 16
    pool = ckpt.pool()
    slots = [pool.alloc(len(ids) + steps) for ids in ckpt.prompts]
    sequences = [list(ids) for ids in ckpt.prompts]
    # Step 0 prefills all prompts together; every later step decodes one token per sequence.
    requests = [(ids, 0, s) for ids, s in zip(sequences, slots)]
    for _ in range(steps):
        logits = run(ckpt.model, pool, requests)
        for seq, rows in zip(sequences, logits):
            seq.append(int(rows[-1].argmax()))
        requests = [([seq[-1]], len(seq) - 1, s) for seq, s in zip(sequences, slots)]

    ckpt.reference.generation_config.eos_token_id = None  # compare all 16 steps, even past an EOS
    for prompt, seq in zip(ckpt.prompts, sequences):
        with torch.inference_mode():
            expected = ckpt.reference.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=steps, pad_token_id=0
            )[0].tolist()
        assert seq == expected


def test_unsupported_model_type_lists_supported_types(tmp_path):
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError) as err:
        load_model(tmp_path)
    assert "gpt2" in str(err.value)
    for model_type in ("llama", "mistral", "qwen2", "qwen3"):
        assert model_type in supported_model_types() and model_type in str(err.value)


def test_length_dependent_rope_is_rejected():
    config = AutoConfig.for_model("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        get_model_class(config)


def test_unknown_hub_id_offline_names_model_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model_path("sglite-tests/no-such-model")
    assert "sglite-tests/no-such-model" in str(err.value)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_path(tmp_path / "missing-dir")


def test_hub_id_resolves_from_local_cache(llama_path, tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--sglite-tests--tiny-llama"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    shutil.copytree(llama_path, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert resolve_model_path("sglite-tests/tiny-llama") == snapshot
    model, config = load_model("sglite-tests/tiny-llama")
    assert config.model_type == "llama" and model.num_layers == config.num_hidden_layers


def _copy_config(src: Path, dst: Path, **changes) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not ...}  # `...` deletes a key
    (dst / "config.json").write_text(json.dumps(config))


def test_sharded_checkpoint_loads_like_single_file(checkpoints, tmp_path):
    ckpt = checkpoints("qwen2")
    tensors = load_file(ckpt.path / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / shard, metadata={"format": "pt"})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _copy_config(ckpt.path, tmp_path)
    sharded, _ = load_model(tmp_path)
    for name, param in ckpt.model.state_dict().items():
        assert torch.equal(sharded.state_dict()[name], param), name


def test_missing_and_unknown_weights_are_named(llama_path, tmp_path):
    tensors = load_file(llama_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    _copy_config(llama_path, tmp_path)
    with pytest.raises(WeightMismatchError) as err:
        load_model(tmp_path)
    assert "model.layers.1.mlp.up_proj.weight" in str(err.value)
    assert "model.layers.1.mlp.extra.weight" in str(err.value)


@pytest.mark.parametrize(
    "case,changes",
    [
        ("mistral", {"sliding_window": 5}),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1, "layer_types": ...}),
        ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
        ("qwen3", {"rope_parameters": YARN_ROPE}),
    ],
    ids=["mistral-sliding-all-layers", "qwen2-sliding-upper-layers", "llama-rope-linear", "qwen3-rope-yarn"],
)
@pytest.mark.slow
def test_config_variants_match_transformers(checkpoints, tmp_path, case, changes):
    """Same weights, edited config.json: sliding windows and scaled RoPE agree with the reference."""
    src = checkpoints(case).path
    _copy_config(src, tmp_path, **changes)
    (tmp_path / "model.safetensors").symlink_to(src / "model.safetensors")
    model, _ = load_model(tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = checkpoints(case).prompts[0]
    with torch.inference_mode():
        expected = reference(torch.tensor([ids])).logits[0]
    pool = KVSlotPool(64, model.num_layers, model.num_kv_heads, model.head_dim)
    slots = pool.alloc(len(ids))
    (full,) = run(model, pool, [(ids, 0, slots)])
    torch.testing.assert_close(full, expected, atol=TOLERANCE, rtol=0)
    # Chunked over the cached prefix: a sliding window must reach back into it.
    head, tail = run(model, pool, [(ids[:9], 0, slots)])[0], run(model, pool, [(ids[9:], 9, slots)])[0]
    assert_same_predictions(torch.cat([head, tail]), expected)


def test_bfloat16_pool_and_float32_logits(llama_path):
    model, _ = load_model(llama_path, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    pool = KVSlotPool(32, model.num_layers, model.num_kv_heads, model.head_dim, dtype=torch.bfloat16)
    (logits,) = run(model, pool, [(list(range(10, 20)), 0, pool.alloc(10))])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.parametrize("case", ["llama", "mistral", "qwen3"])
def test_decode_steps_share_a_forward_with_prefill_chunks(checkpoints, case):
    """A decode token, a fresh prefill and a chunk over a cached prefix in one forward: each as if alone."""
    ckpt = checkpoints(case)
    pool = ckpt.pool(512)
    long_ids, short_ids, other = ckpt.prompts
    slots = {n: pool.alloc(len(i)) for n, i in (("long", long_ids), ("short", short_ids), ("other", other))}
    run(ckpt.model, pool, [(short_ids[:-1], 0, slots["short"]), (other[:5], 0, slots["other"])])
    requests = [
        (short_ids[-1:], len(short_ids) - 1, slots["short"]),
        (long_ids, 0, slots["long"]),
        (other[5:], 5, slots["other"]),
    ]
    for request, rows in zip(requests, run(ckpt.model, pool, requests)):
        (alone,) = run(ckpt.model, pool, [request])
        assert_same_predictions(rows, alone)


def test_building_a_checkpoint_leaves_the_global_rng_alone(tmp_path):
    from sglite.runtime.loading.tiny_model import build_tiny_model

    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    build_tiny_model("llama", tmp_path / "fresh", num_hidden_layers=1)  # a fresh build, not the disk cache
    assert torch.equal(torch.rand(3), expected)
