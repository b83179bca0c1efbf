"""bfloat16 linear layers over 32-column weight panels (``runtime/panel_gemm.py``): products within one
bfloat16 rounding of an exact reference and equal to ``F.linear``'s wherever oneDNN sums in the same
order, for every row count (whole and partial tiles), partial panels, bias and input layout; the op
inside a compiled graph; bad inputs are errors; a bfloat16 model runs its linears as panels and greedy
output matches the oneDNN layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sglite
from sglite.runtime.kernels import library as native_kernels, panel_gemm
from sglite.runtime.model_runner import ModelRunner
from sglite.runtime.kernels.packed_linear import PackedLinear, pack_linears
from sglite.runtime.kernels.huge_page_arena import HugePageArena


def _available() -> bool:
    return native_kernels.toolchain_found() and native_kernels.load() and panel_gemm.available()


pytestmark = pytest.mark.skipif(not _available(), reason="needs the C++ library and a CPU with AVX512-BF16")


def panel_layer(layer: nn.Linear) -> PackedLinear:
    arena = HugePageArena(HugePageArena.bytes_for([2 * layer.weight.numel() + 2 * 32 * layer.in_features]))
    return PackedLinear.from_linear(layer, keep_dense=False, arena=arena)


def bf16_reference(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """The exact product (float64) of the bfloat16 inputs, then the bias; before the final rounding."""
    out = x.double() @ layer.weight.double().T
    return out if layer.bias is None else out + layer.bias.double()


@pytest.mark.parametrize("rows", [0, 1, 5, 12, 13, 32, 300])  # tiles of 12 rows: whole, partial, several
@pytest.mark.parametrize("out_features,in_features", [(96, 576), (80, 64), (33, 2), (7, 130), (1000, 576)])  # partial panels; (1000, 576): groups
@pytest.mark.parametrize("bias", [False, True])
def test_products_are_one_rounding_from_exact(rows, out_features, in_features, bias):
    torch.manual_seed(rows * 1000 + out_features)
    layer = nn.Linear(in_features, out_features, bias=bias).to(torch.bfloat16)
    packed = panel_layer(layer)
    assert packed.kernel == "panels" and packed.weight is None
    x = torch.randn(rows, in_features, dtype=torch.bfloat16)
    with torch.inference_mode():
        got = packed(x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
    exact = bf16_reference(x, layer)
    # float32 sums (relative error far below bfloat16's), rounded once: within one bfloat16 step of exact
    step = torch.finfo(torch.bfloat16).eps * exact.abs().clamp(min=1e-3)
    assert ((got.double() - exact).abs() <= step).all()
    if rows >= 5:
        with torch.inference_mode():
            assert (got == F.linear(x, layer.weight, layer.bias)).float().mean() > 0.99  # oneDNN sums in the same order


def test_inputs_of_any_layout_and_rank():
    torch.manual_seed(0)
    layer = nn.Linear(64, 48).to(torch.bfloat16)
    packed = panel_layer(layer)
    x = torch.randn(2, 7, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        want = packed(x.reshape(14, 64)).view(2, 7, 48)
        assert torch.equal(packed(x), want)
        transposed = x.reshape(14, 64).t().contiguous().t()  # not contiguous
        assert not transposed.is_contiguous()
        assert torch.equal(packed(transposed), want.view(14, 48))


def test_packing_pads_the_last_panel_with_zero_columns():
    weight = torch.arange(33 * 4, dtype=torch.float32).view(33, 4).to(torch.bfloat16)
    panels = torch.full(panel_gemm.panels_shape(33, 4), 7.0, dtype=torch.bfloat16)
    assert panels.shape == (2, 2, 32, 2)
    panel_gemm.pack_panels(weight, panels)
    # panel p, input pair j, column c, element e  <-  weight[32 p + c, 2 j + e]
    assert torch.equal(panels[0, 1, 5], weight[5, 2:4])
    assert torch.equal(panels[1, 0, 0], weight[32, 0:2])
    assert (panels[1, :, 1:] == 0).all()


def test_bad_inputs_are_errors():
    layer = nn.Linear(64, 40).to(torch.bfloat16)
    panels = panel_layer(layer)._packed[0]
    op = torch.ops.sglite.panel_linear
    with pytest.raises(RuntimeError, match="bfloat16"):
        op(torch.randn(3, 64), panels, 40, None)
    with pytest.raises(RuntimeError, match="features"):
        op(torch.randn(3, 62, dtype=torch.bfloat16), panels, 40, None)
    with pytest.raises(RuntimeError, match="does not fit"):
        op(torch.randn(3, 64, dtype=torch.bfloat16), panels, 65, None)
    with pytest.raises(RuntimeError, match="bias"):
        op(torch.randn(3, 64, dtype=torch.bfloat16), panels, 40, torch.zeros(39, dtype=torch.bfloat16))


def test_a_compiled_graph_calls_the_op():
    torch.manual_seed(1)
    layer = nn.Linear(64, 40).to(torch.bfloat16)
    packed = panel_layer(layer)
    seen: list[str] = []

    def backend(gm: torch.fx.GraphModule, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    x = torch.randn(6, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(torch.compile(packed, backend=backend, fullgraph=True)(x), packed(x))
        inductor = torch.compile(packed, fullgraph=True)
        assert torch.equal(inductor(x), packed(x))
    assert any("panel_linear" in target for target in seen)
    assert not any("linear" in target and "panel" not in target for target in seen)


def test_pack_linears_puts_bfloat16_layers_in_panels_in_one_arena():
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.proj = nn.Linear(16, 40)
            self.odd = nn.Linear(15, 16)  # odd input width: no pairs, oneDNN
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.embed.weight

    model = Tiny().to(torch.bfloat16)
    x = torch.randint(0, 50, (4,))
    with torch.inference_mode():
        before = model.head(model.proj(model.embed(x))[:, :16])
    assert pack_linears(model, keep_dense=True) == 3
    assert model.proj.kernel == "panels" and model.proj.weight is None  # keep_dense concerns oneDNN layers only
    assert model.head.kernel == "panels" and model.head.weight is model.embed.weight  # tied: kept for the embedding
    assert model.odd.kernel == "onednn" and model.odd.weight is not None
    bases = {m._packed[0].untyped_storage().data_ptr() for m in (model.proj, model.head)}
    assert len(bases) == 1  # views of one arena
    with torch.inference_mode():
        after = model.head(model.proj(model.embed(x))[:, :16])
    assert torch.allclose(after.float(), before.float(), atol=0.05, rtol=0.02)


def test_a_bfloat16_runner_uses_panels_and_greedy_output_matches_onednn(llama_path):
    runner = ModelRunner(str(llama_path), "cpu", "bfloat16")
    kernels = {m.kernel for m in runner.model.modules() if isinstance(m, PackedLinear)}
    assert kernels == {"panels"}
    del runner
    prompts = [[1, 5, 9, 14, 3], [7, 7, 2], list(range(3, 40))]
    params = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    with sglite.Engine(str(llama_path), dtype="bfloat16") as engine:
        panels = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)]
    with sglite.Engine(str(llama_path), dtype="bfloat16", packed_linear="onednn") as engine:
        assert {m.kernel for m in engine.runner.model.modules() if isinstance(m, PackedLinear)} == {"onednn"}
        onednn = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)]
    assert panels == onednn
