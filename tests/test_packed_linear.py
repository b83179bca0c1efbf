"""Linear layers prepacked for oneDNN (``runtime/packed_linear.py``): the same products as ``F.linear``,
every CPU linear of a loaded model packed, the plain weight kept only where something reads it, and a
compiled graph tracing the plain weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sglite
from sglite.runtime.model_runner import ModelRunner
from sglite.runtime.kernels.packed_linear import PackedLinear, pack_linears, packing_supported

needs_onednn = pytest.mark.skipif(not packing_supported(torch.float32), reason="torch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 64, 300])
def test_packed_products_equal_f_linear(dtype, bias, rows):
    if not packing_supported(dtype):
        pytest.skip(f"oneDNN runs {dtype} emulated on this CPU")
    torch.manual_seed(rows)
    layer = nn.Linear(96, 80, bias=bias).to(dtype)
    packed = PackedLinear.from_linear(layer, keep_dense=False)
    x = torch.randn(rows, 96, dtype=dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.inference_mode():
        got, want = packed(x), F.linear(x, layer.weight, layer.bias)
        assert got.dtype == dtype and got.shape == (rows, 80)
        assert torch.allclose(got.float(), want.float(), atol=tolerance, rtol=tolerance)
        # a [batch, tokens, in] input and a transposed (non-contiguous) one
        assert torch.allclose(packed(x.view(1, rows, 96)).float(), want.float().view(1, rows, 80), atol=tolerance, rtol=tolerance)
        xt = x.t().contiguous().t()
        assert not xt.is_contiguous() or rows == 1
        assert torch.allclose(packed(xt).float(), want.float(), atol=tolerance, rtol=tolerance)


@needs_onednn
def test_a_packed_layer_drops_its_plain_weight_unless_asked():
    layer = nn.Linear(64, 32)
    dropped = PackedLinear.from_linear(layer, keep_dense=False)
    kept = PackedLinear.from_linear(layer, keep_dense=True)
    assert dropped.weight is None and kept.weight is layer.weight
    assert [name for name, _ in dropped.named_parameters()] == ["bias"]
    assert "weight" not in dropped.state_dict()
    assert dropped.kernel_bytes() >= 64 * 32 * 4 + 32 * 4


@needs_onednn
def test_pack_linears_keeps_a_tied_head_and_skips_what_onednn_cannot_run():
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.proj = nn.Linear(16, 16)
            self.wide = nn.Linear(16, 16).double()  # float64: no oneDNN kernel, left as is
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.embed.weight

    model = Tiny()
    x = torch.randint(0, 50, (4,))
    with torch.inference_mode():
        before = model.head(model.proj(model.embed(x)))
    assert pack_linears(model, keep_dense=False) == 2
    assert isinstance(model.proj, PackedLinear) and model.proj.weight is None
    assert isinstance(model.head, PackedLinear) and model.head.weight is model.embed.weight  # shared: kept
    assert type(model.wide) is nn.Linear
    with torch.inference_mode():
        assert torch.allclose(model.head(model.proj(model.embed(x))), before, atol=1e-5)


@needs_onednn
def test_a_compiled_graph_runs_the_plain_weight():
    layer = nn.Linear(32, 24)
    packed = PackedLinear.from_linear(layer, keep_dense=True)
    seen: list[str] = []

    def backend(gm: torch.fx.GraphModule, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    x = torch.randn(3, 32)
    compiled = torch.compile(packed, backend=backend, fullgraph=True)
    with torch.inference_mode():
        assert torch.allclose(compiled(x), layer(x), atol=1e-6)
    assert any("linear" in target for target in seen)
    assert not any("mkldnn" in target for target in seen)


@needs_onednn
def test_the_runner_packs_its_linears_and_the_option_turns_it_off(llama_path):
    runner = ModelRunner(str(llama_path), "cpu", "float32")
    packed = [m for m in runner.model.modules() if isinstance(m, PackedLinear)]
    plain = [m for m in runner.model.modules() if type(m) is nn.Linear]
    # per layer qkv, o, gate_up and down, and the head
    assert len(packed) == 4 * runner.model.num_layers + 1 and not plain
    tied_head = runner.model.lm_head if runner.model.tied_embeddings else None
    assert all(m.weight is None for m in packed if m is not tied_head)  # only a head sharing the embedding keeps it
    unpacked = ModelRunner(str(llama_path), "cpu", "float32", packed_linear="off")
    assert not any(isinstance(m, PackedLinear) for m in unpacked.model.modules())


@needs_onednn
def test_greedy_output_is_the_same_packed_or_not(llama_path, monkeypatch):
    # SGLITE_PACKED_LINEAR=0 is the user's switch: read into EngineConfig.packed_linear at engine start
    prompts = [[1, 5, 9, 14, 3], [7, 7, 2], list(range(3, 40))]
    params = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    with sglite.Engine(str(llama_path), dtype="float32") as engine:
        assert any(isinstance(m, PackedLinear) for m in engine.runner.model.modules())
        packed = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)]
    monkeypatch.setenv("SGLITE_PACKED_LINEAR", "0")
    with sglite.Engine(str(llama_path), dtype="float32") as engine:
        assert engine.config.packed_linear == "off" and not any(isinstance(m, PackedLinear) for m in engine.runner.model.modules())
        plain = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)]
    assert packed == plain
