"""The captured decode step (``enable_torch_compile``): the pool-read-only decode forward equals the
eager paged path, and compiled engines stay token-identical to transformers (float32)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import sglite
from sglite.runtime.compiled_decode import CompiledDecode
from sglite.runtime.forward_batch import ForwardBatch
from sglite.runtime.kv_pool import KVSlotPool
from sglite.runtime.loading.model_loader import load_model
from sglite.runtime.kernels import library as native_kernels
from sglite.runtime.models.decode_attention import DecodeContext

CONTEXTS = [5, 17, 40, 3]


def decode_batch(contexts: list[int], width: int = 64) -> ForwardBatch:
    """A decode step for sequences with ``contexts[i]`` cached tokens at slots ``i * width ...``."""
    slots = [torch.arange(i * width, i * width + n + 1) for i, n in enumerate(contexts)]
    return ForwardBatch(
        input_ids=torch.arange(3, 3 + len(contexts)),
        positions=torch.tensor(contexts),
        out_slots=torch.stack([s[-1] for s in slots]),
        prefix_lens=list(contexts),
        extend_lens=[1] * len(contexts),
        kv_slots=slots,
    )


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@torch.inference_mode()
def test_pool_read_only_decode_step_equals_the_paged_forward(tiny_model_factory, family):
    model, _ = load_model(tiny_model_factory(family))
    model.fuse_projections()
    pool = KVSlotPool(64 * len(CONTEXTS), model.num_layers, model.num_kv_heads, model.head_dim)
    torch.manual_seed(0)
    pool.kv.normal_()  # cached K/V: arbitrary but fixed
    batch = decode_batch(CONTEXTS)
    before = pool.kv.clone()

    cached = DecodeContext.from_slots([s[:-1] for s in batch.kv_slots])
    logits, new_kv = model.decode_step(batch.input_ids, batch.positions, pool.kv, cached)
    assert torch.equal(pool.kv, before)  # nothing written: the caller stores new_kv

    expected = model.compute_logits(model(batch, pool))  # eager: writes K/V into the pool, then attends
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)  # summation order differs
    assert logits.argmax(-1).tolist() == expected.argmax(-1).tolist()
    written = pool.kv[:, :, batch.out_slots]
    assert torch.equal(new_kv[0], written[0])  # layer 0 sees identical inputs
    torch.testing.assert_close(new_kv, written, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", [True, False])
def test_compiled_decode_accepts_only_decode_batches_it_can_serve(llama_path, monkeypatch, kernel):
    monkeypatch.setattr(native_kernels, "is_loaded", lambda: kernel)
    model, _ = load_model(llama_path)
    step = CompiledDecode(model, max_batch_size=4)  # compiles lazily: nothing is built here
    assert step.accepts(decode_batch([5, 17, 40, 3]))
    assert not step.accepts(decode_batch([5] * 5))  # past max_batch_size
    prefill = ForwardBatch(torch.arange(4), torch.arange(4), torch.arange(4), [0], [4], [torch.arange(4)])
    assert not step.accepts(prefill)
    # padding to 3000 keys would triple the keys the gathered attention reads; the C++ kernel reads each row's own
    assert step.accepts(decode_batch([20, 20, 20, 3000], width=4096)) == kernel
    assert step.steps == 0


@pytest.mark.parametrize("value", [0, 129, 2.5])
def test_torch_compile_max_bs_out_of_range_is_refused_before_loading(value):
    with pytest.raises(ValueError, match="torch_compile_max_bs"):
        sglite.Engine("/nonexistent/model", enable_torch_compile=True, torch_compile_max_bs=value)


STEPS = 10


@pytest.fixture(scope="module")
def reference(llama_path):
    model = AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    ids = [[5 + i, 9, 40 + 3 * i, 7][: 2 + i % 3] * (1 + i) for i in range(5)]
    with torch.inference_mode():
        outputs = [
            model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=STEPS, pad_token_id=0)[0, len(p) :].tolist()
            for p in ids
        ]
    return ids, outputs


@pytest.mark.slow
def test_compiled_engine_matches_transformers_alone_and_batched(llama_path, reference):
    ids, expected = reference
    params = {"max_new_tokens": STEPS, "temperature": 0, "ignore_eos": True}
    with sglite.Engine(str(llama_path), dtype="float32", max_total_tokens=2048, enable_torch_compile=True) as engine:
        alone = engine.generate(input_ids=ids[0], sampling_params=params)
        batched = engine.generate(input_ids=ids, sampling_params=params)
        engine.check_invariant()  # no slot leaked by the out-of-graph K/V write
        steps = engine.runner.compiled_decode.steps
        buckets = engine.runner.compiled_decode.buckets_used
    assert alone["output_ids"] == expected[0]
    assert [o["output_ids"] for o in batched] == expected
    assert steps >= 2 * (STEPS - 1)  # both the batch-1 and the batched decode steps ran compiled
    assert buckets == {1, 8}  # 5 sequences ran in the 8-row graph (3 dummy rows, never stored)
