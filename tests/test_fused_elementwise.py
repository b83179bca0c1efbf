"""SwiGLU's product and the rotary embedding in one pass (``runtime/models/fused_elementwise.py``): the C++
ops give the torch form's exact values in float32 and bfloat16, take q and k as a view of a fused qkv
output, run in an eager model forward, and stay out of compiled graphs."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from sglite.runtime.kernels import library as native_kernels
from sglite.runtime.model_runner import ModelRunner
from sglite.runtime.kernels.fused_elementwise import apply_rotary, silu_and_mul

pytestmark = pytest.mark.skipif(
    not native_kernels.toolchain_found(), reason="no C++ compiler or ninja to build the kernels with"
)


@pytest.fixture(autouse=True, scope="module")
def built_kernels():
    assert native_kernels.load()


def torch_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin[:, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [1, 7, 16, 33, 1536])
def test_silu_and_mul_equals_the_torch_form(dtype, width):
    torch.manual_seed(width)
    gate_up = (torch.randn(2, 3, 2 * width) * 4).to(dtype)
    got = torch.ops.sglite.silu_and_mul(gate_up)
    assert got.shape == (2, 3, width) and got.dtype == dtype
    assert torch.equal(got, F.silu(gate_up[..., :width]) * gate_up[..., width:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [2, 6, 64, 96, 128])
def test_rotary_equals_the_torch_form_on_a_view_of_qkv(dtype, head_dim):
    torch.manual_seed(head_dim)
    tokens, heads, kv_heads = 11, 6, 2
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim).to(dtype)
    cos, sin = torch.randn(tokens, head_dim).to(dtype), torch.randn(tokens, head_dim).to(dtype)
    qk = qkv[:, : heads + kv_heads]  # rows of (heads + 2 kv_heads) x head_dim: not contiguous
    assert not qk.is_contiguous()
    got = torch.ops.sglite.rotary(qk, cos, sin)
    assert got.is_contiguous() and got.dtype == dtype
    assert torch.equal(got, torch_rotary(qk, cos, sin))


def test_the_wrappers_keep_the_torch_form_inside_a_compiled_graph():
    seen: list[str] = []

    def backend(gm: torch.fx.GraphModule, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    def layer(gate_up, x, cos, sin):
        return silu_and_mul(gate_up), apply_rotary(x, cos, sin)

    args = (torch.randn(4, 16), torch.randn(4, 3, 8), torch.randn(4, 8), torch.randn(4, 8))
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    for got, want in zip(compiled(*args), layer(*args)):
        assert torch.allclose(got, want, atol=1e-6)
    assert seen and not any("sglite" in target for target in seen)  # inductor fuses the torch form itself


def test_an_eager_forward_runs_both_ops_once_a_layer(llama_path):
    runner = ModelRunner(str(llama_path), "cpu", "float32")
    assert native_kernels.is_loaded()
    pool = runner.make_pool(64)
    from sglite.runtime.forward_batch import ForwardBatch

    ids = torch.tensor([3, 9, 4, 17, 5])
    batch = ForwardBatch(
        input_ids=ids, positions=torch.arange(5), out_slots=torch.arange(5), prefix_lens=[0], extend_lens=[5],
        kv_slots=[torch.arange(5)],
    )
    with profile() as prof:
        runner.forward(batch, pool, torch.tensor([4]))
    calls = {e.key: e.count for e in prof.key_averages()}
    layers = runner.model.num_layers
    assert calls.get("sglite::silu_and_mul") == layers and calls.get("sglite::rotary") == layers
