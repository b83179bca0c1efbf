"""Weight-only int8/int4 quantization: the packed kernels compute what the dequantized weight says,
the engine runs quantized, and quantized greedy output stays close to float32 on the real model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sglite
from sglite.runtime.forward_batch import ForwardBatch
from sglite.runtime.loading.model_loader import load_model
from sglite.runtime.model_runner import ModelRunner
from sglite.runtime.loading.quantization import (
    KERNEL_MAX_ROWS,
    QuantizationError,
    QuantizedLinear,
    quantize_model,
)


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, max(KERNEL_MAX_ROWS.values()) + 8])  # packed kernel x2, dense path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_matmul_matches_dequantized_reference(method, rows, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=True)
    layer = QuantizedLinear.from_linear(linear, method)
    weight = layer.dequantize(torch.float32)
    x = torch.randn(rows, 256).to(dtype)
    expected = x.float() @ weight.t() + linear.bias.detach()
    with torch.profiler.profile() as prof:
        out = layer(x)
    kernel = {"int8": "aten::_weight_int8pack_mm", "int4": "aten::_weight_int4pack_mm_for_cpu"}[method]
    assert (kernel in {e.name for e in prof.events()}) == (rows <= KERNEL_MAX_ROWS[method])
    # the kernels take bfloat16 activations: allow bfloat16 rounding of x and of the result (~2^-8 relative)
    torch.testing.assert_close(out.float(), expected, atol=0.02 * expected.abs().max().item(), rtol=0)
    # the dequantized weight is the float weight up to half a quantization step (a step spans at
    # most 2/127 of the row's range for int8, 2/15 of the group's for int4), plus bfloat16 scales
    half_step = {"int8": 1 / 127, "int4": 1 / 15}[method]
    assert (weight - linear.weight).abs().max() <= (half_step + 0.01) * linear.weight.abs().max()


def test_int4_codes_span_each_group():
    torch.manual_seed(0)
    linear = nn.Linear(64, 16, bias=False)
    layer = QuantizedLinear.from_linear(linear, "int4")
    codes = torch.stack([layer.nibbles & 15, layer.nibbles >> 4], -1).view(16, 2, 32)
    assert codes.amin(-1).eq(0).all() and codes.amax(-1).eq(15).all()  # min..max of a group -> 0..15


def test_quantize_model_replaces_every_linear_and_shrinks_weights(llama_path):
    model, _ = load_model(llama_path)
    dense_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, nn.Linear))
    count = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert quantize_model(model, "int8") == count
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    quantized_bytes = sum(
        b.numel() * b.element_size() for m in model.modules() if isinstance(m, QuantizedLinear) for b in m.buffers()
    )
    assert quantized_bytes < 0.27 * dense_bytes  # 1 byte a weight + a scale a row, against 4


def test_int4_refuses_shapes_the_kernel_cannot_take():
    with pytest.raises(QuantizationError, match="int8"):
        QuantizedLinear.from_linear(nn.Linear(48, 16), "int4")


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_engine_generates_quantized(llama_path, method):
    params = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
    with sglite.Engine(str(llama_path), quantization=method, max_total_tokens=512) as engine:
        assert sum(isinstance(m, QuantizedLinear) for m in engine.runner.model.modules()) > 0
        batched = engine.generate(["def f(x):", "The quick brown fox"], params)
        alone = engine.generate("def f(x):", params)
    assert all(len(o["output_ids"]) == 6 for o in batched)
    assert alone["output_ids"] == batched[0]["output_ids"]


def test_unknown_quantization_is_an_error(llama_path):
    with pytest.raises(ValueError, match="quantization"):
        sglite.Engine(str(llama_path), quantization="int3")


REAL_PROMPTS = [
    "Write a short poem about the sea.",
    "What is the capital of France? Answer in one sentence.",
    "List three uses of a paperclip.",
    "Explain what a hash table is.",
]


def teacher_forced_agreement(runner: ModelRunner, prompts: list[list[int]], targets: list[list[int]]) -> float:
    """Decode ``targets`` one token a step (all sequences in one batch, each fed the target's own
    previous token); the fraction of steps whose greedy choice equals the target token."""
    pool = runner.make_pool(sum(len(p) + len(t) for p, t in zip(prompts, targets)))
    slots = [pool.alloc(len(p) + len(t)) for p, t in zip(prompts, targets)]
    agree = total = 0
    feeds = [list(p) for p in prompts]  # step 0: the prompts
    prefix = [0] * len(prompts)
    for step in range(len(targets[0])):
        batch = ForwardBatch(
            input_ids=torch.tensor([t for f in feeds for t in f]),
            positions=torch.cat([torch.arange(n, n + len(f)) for n, f in zip(prefix, feeds)]),
            out_slots=torch.cat([s[n : n + len(f)] for s, n, f in zip(slots, prefix, feeds)]),
            prefix_lens=list(prefix),
            extend_lens=[len(f) for f in feeds],
            kv_slots=[s[: n + len(f)] for s, n, f in zip(slots, prefix, feeds)],
        )
        chosen = runner.forward(batch, pool, batch.last_token_indices()).argmax(-1).tolist()
        agree += sum(c == t[step] for c, t in zip(chosen, targets))
        total += len(targets)
        prefix = [n + len(f) for n, f in zip(prefix, feeds)]
        feeds = [[t[step]] for t in targets]
    return agree / total


REAL_PROMPTS = [
    "Write a short poem about the sea.",
    "What is the capital of France? Answer in one sentence.",
    "List three uses of a paperclip.",
    "Explain what a hash table is.",
]


@pytest.mark.slow
@pytest.mark.parametrize("method, floor", [("int8", 0.85), ("int4", 0.85)])
def test_quantized_greedy_tokens_agree_with_float(real_model_path, method, floor):
    """Given the float32 engine's greedy continuations, the quantized model's greedy choice at each
    decode step (packed-kernel path) equals float32's on at least ``floor`` of the steps."""
    params = {"max_new_tokens": 40, "temperature": 0, "ignore_eos": True}
    with sglite.Engine(real_model_path, dtype="float32", max_total_tokens=2048) as engine:
        chats = [[{"role": "user", "content": p}] for p in REAL_PROMPTS]
        prompts = [engine.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in chats]
        prompts = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompts]
        reference = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)]
    assert teacher_forced_agreement(ModelRunner(real_model_path, "cpu", "float32"), prompts, reference) == 1.0
    runner = ModelRunner(real_model_path, "cpu", "float32", quantization=method)
    assert teacher_forced_agreement(runner, prompts, reference) >= floor
