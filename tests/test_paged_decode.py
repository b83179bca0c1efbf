"""The C++ decode-attention kernel (``runtime/models/paged_decode.py``): equal to the torch
formulation it replaces for every head size, GQA group, dtype and context length; callable inside
a ``torch.compile`` graph; a bad slot is an error, not a stray read; and the engine's decode steps
run through it with greedy output unchanged."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import sglite
from sglite.runtime.kernels import library as native_kernels
from sglite.runtime.kernels import paged_decode
from sglite.runtime.models.decode_attention import DecodeContext, decode_attention_gathered


pytestmark = pytest.mark.skipif(
    not native_kernels.toolchain_found(), reason="no C++ compiler or ninja to build the kernel with"
)


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert native_kernels.load(), "the kernels failed to build (see the warning logged by native_kernels.load)"


def problem(batch, heads, kv_heads, dim, lengths, dtype, slots=512, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    q, k, v = rand(batch, heads, dim), rand(batch, kv_heads, dim), rand(batch, kv_heads, dim)
    k_cache, v_cache = rand(slots, kv_heads, dim), rand(slots, kv_heads, dim)
    cached = DecodeContext.from_slots([torch.randperm(slots, generator=gen)[:n] for n in lengths])
    return q, k, v, k_cache, v_cache, cached


@pytest.mark.parametrize("dim", [64, 128, 24])  # 64/128: the register paths; 24: any other head size
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3), (8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_the_gathered_torch_attention(dim, heads, kv_heads, dtype):
    lengths = [0, 1, 17, 100, 33]  # 0: a first decode step attends only to its own key
    q, k, v, k_cache, v_cache, cached = problem(len(lengths), heads, kv_heads, dim, lengths, dtype)
    scaling = dim**-0.5
    got = paged_decode.paged_decode_attention(q, k, v, k_cache, v_cache, cached.kv_index, cached.kv_lens, scaling)
    want = decode_attention_gathered(q, k, v, k_cache, v_cache, cached, scaling)
    assert got.shape == want.shape == (len(lengths), heads * dim) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # the reference rounds probabilities to bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q_k_and_v_may_be_views_of_wider_rows(dtype):
    """A compiled step hands q, k and v as views of the fused qkv output (rows wider than their heads)."""
    lengths = [3, 40, 0, 12]
    q, k, v, k_cache, v_cache, cached = problem(len(lengths), 9, 3, 64, lengths, dtype)
    qkv = torch.cat((q.flatten(1), k.flatten(1), v.flatten(1), torch.zeros(len(lengths), 8, dtype=dtype)), dim=1)
    q_view = qkv[:, :576].view(-1, 9, 64)
    k_view, v_view = qkv[:, 576:768].view(-1, 3, 64), qkv[:, 768:960].view(-1, 3, 64)
    assert not q_view.is_contiguous() and q_view.stride(0) == 968
    args = (cached.kv_index, cached.kv_lens, 0.125)
    got = paged_decode.paged_decode_attention(q_view, k_view, v_view, k_cache, v_cache, *args)
    assert torch.equal(got, paged_decode.paged_decode_attention(q, k, v, k_cache, v_cache, *args))


def test_kernel_matches_a_written_out_softmax_in_float64():
    q, k, v, k_cache, v_cache, cached = problem(2, 6, 2, 64, [9, 4], torch.float32)
    got = paged_decode.paged_decode_attention(q, k, v, k_cache, v_cache, cached.kv_index, cached.kv_lens, 0.125)
    for b, n in enumerate([9, 4]):
        slots = cached.kv_index[b, :n]
        keys = torch.cat((k_cache[slots], k[b : b + 1])).double()  # [n + 1, kv_heads, d]
        values = torch.cat((v_cache[slots], v[b : b + 1])).double()
        for head in range(6):
            kv = head // 3
            weights = torch.softmax(keys[:, kv] @ q[b, head].double() * 0.125, 0)
            torch.testing.assert_close(got[b, head * 64 : (head + 1) * 64].double(), weights @ values[:, kv], rtol=1e-5, atol=1e-6)


def test_kernel_runs_inside_a_compiled_graph():
    q, k, v, k_cache, v_cache, cached = problem(3, 9, 3, 64, [5, 40, 12], torch.float32)

    def step(q, k, v, k_cache, v_cache, kv_index, kv_lens):
        return paged_decode.paged_decode_attention(q * 2, k, v, k_cache, v_cache, kv_index, kv_lens, 0.125) + 1

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    got = compiled(q, k, v, k_cache, v_cache, cached.kv_index, cached.kv_lens)
    torch.testing.assert_close(got, step(q, k, v, k_cache, v_cache, cached.kv_index, cached.kv_lens))


def test_the_op_dispatches_to_the_cpp_kernel_without_python():
    # the loaded library registered the CPU kernel itself; no Python function sits between dispatcher and C++
    assert torch._C._dispatch_has_kernel_for_dispatch_key("sglite::paged_decode_attention", "CPU")
    q, k, v, k_cache, v_cache, cached = problem(2, 4, 2, 64, [3, 20], torch.float32)
    got = torch.ops.sglite.paged_decode_attention.default(q, k, v, k_cache, v_cache, cached.kv_index, cached.kv_lens, 0.125)
    torch.testing.assert_close(got, decode_attention_gathered(q, k, v, k_cache, v_cache, cached, 0.125))


def test_a_slot_outside_the_pool_is_an_error():
    q, k, v, k_cache, v_cache, cached = problem(2, 4, 2, 64, [3, 3], torch.float32, slots=64)
    kv_index = cached.kv_index.clone()
    kv_index[1, 2] = 64
    with pytest.raises(RuntimeError, match="outside the pool"):
        paged_decode.paged_decode_attention(q, k, v, k_cache, v_cache, kv_index, cached.kv_lens, 0.125)


def test_engine_decode_runs_through_the_kernel_with_unchanged_greedy_output(llama_path, monkeypatch):
    prompts = [[5, 9, 40, 7] * (1 + i) for i in range(4)]
    params = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
    calls = []
    real = paged_decode.paged_decode_attention

    def counted(*args):
        calls.append(args[0].shape[0])
        return real(*args)

    with sglite.Engine(str(llama_path), dtype="float32", max_total_tokens=1024) as engine:
        monkeypatch.setattr(paged_decode, "paged_decode_attention", counted)
        with_kernel = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)]
        monkeypatch.setattr(native_kernels, "_library", [])  # is_loaded() is False: the torch formulation
        without = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)]
    assert calls and max(calls) == len(prompts)  # batched decode steps went through the kernel
    assert with_kernel == without


def test_a_failed_build_falls_back_with_one_warning(monkeypatch, caplog):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setattr(native_kernels, "_library", [])
    with caplog.at_level("WARNING", logger="sglite.runtime.kernels.library"):
        assert native_kernels.load.__wrapped__() is False  # the uncached body: a fresh attempt
    assert not native_kernels.is_loaded()
    assert "did not build" in caplog.text and "Ninja is required" in caplog.text


def test_native_kernels_off_never_builds_them(llama_path, monkeypatch):
    from sglite.runtime.model_runner import ModelRunner

    builds = []
    monkeypatch.setattr(native_kernels, "load", lambda: builds.append(1) or True)
    ModelRunner(str(llama_path), "cpu", "float32", native_kernels=False)
    assert builds == []
    ModelRunner(str(llama_path), "cpu", "float32")
    assert builds == [1]


def test_the_build_is_named_for_the_cpu_capability_and_not_tuned_to_this_machine():
    name, flags, _ = native_kernels._build_options()
    capability = torch.backends.cpu.get_cpu_capability()
    assert name.endswith(capability.lower() if capability in native_kernels.CAPABILITY_FLAGS else "default")
    assert not any(flag.startswith(("-march", "-mtune")) for flag in flags)  # a shared cache may serve other CPUs


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not torch.backends.openmp.is_available(), reason="torch on OpenMP, Linux"
)
def test_the_kernels_parallel_regions_run_on_torchs_own_openmp_runtime():
    """at::parallel_for is an OpenMP region compiled into the library: built without -fopenmp it would run on
    one thread whatever torch's thread count; linked by soname, it must not load a second libgomp."""
    maps = [line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "/" in line]
    library = {path for path in maps if "sglite_native" in Path(path).name}
    assert len(library) == 1
    assert b"GOMP_parallel" in Path(library.pop()).read_bytes()  # the regions call into libgomp
    assert len({path for path in maps if Path(path).name.startswith("libgomp")}) == 1
