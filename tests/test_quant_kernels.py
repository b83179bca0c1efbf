"""Quantized CPU kernels (llama.cpp's dot products per ISA level) against dequantize-then-matmul in float64.

Every test runs at every level this CPU executes (levels it lacks are skipped with the missing flags named),
so an AVX512 machine also checks the AVX2 and portable builds; the reference path (what runs where nothing
builds) is a level of its own here.
"""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch

from sglite.runtime.config import CPU_KERNEL_LEVELS, EngineConfig
from sglite.runtime.kernels import ggml_build, ggml_kernels
from sglite.runtime.kernels.quant_linear import (
    SUPPORTED_QTYPES,
    QuantEmbedding,
    QuantFormatError,
    QuantizedTensor,
    QuantLinear,
    dequantize,
    quant_matmul,
    set_kernel_level,
)

Q = gguf.GGMLQuantizationType
BLOCK_QTYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
K_QUANTS = {Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}
ACTIVATION_BLOCK = {t: 256 if t in K_QUANTS else 32 for t in BLOCK_QTYPES}  # q8_K vs q8_0 / q8_1
LEVELS = [*ggml_build.LEVELS, "reference"]


@pytest.fixture(params=LEVELS)
def level(request):
    """Runs the test with the kernels of one level, restoring the automatic choice afterwards."""
    name = request.param
    if name == "reference":
        set_kernel_level("auto")
        saved = ggml_kernels._State.index
        ggml_kernels._State.index = -1  # what runs where no native library builds
        yield name
        ggml_kernels._State.index = saved
        return
    if name not in ggml_kernels.available_levels():
        missing = sorted(ggml_build.LEVEL_CPU_FLAGS[name] - ggml_build.cpu_flags())
        pytest.skip(f"this CPU cannot run the {name} kernels (lacks {', '.join(missing) or 'x86'})")
    assert set_kernel_level(name) == name
    yield name
    set_kernel_level("auto")


def make_weight(qtype: int, rows: int, cols: int, seed: int = 0) -> QuantizedTensor:
    """Random normal weights quantized by gguf (legacy formats) or llama.cpp's reference quantizer (K-quants)."""
    dense = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    if qtype in K_QUANTS:
        ggml_kernels._load_level("portable")
        portable = ggml_build.LEVELS.index("portable")
        blocks = torch.ops.sglite.ggml_quantize_ref(dense, int(qtype), portable)
    else:
        blocks = torch.from_numpy(gguf.quants.quantize(dense.numpy(), qtype).view(np.uint8).reshape(rows, -1))
    return QuantizedTensor(blocks, qtype, (rows, cols))


def reference_dense(qt: QuantizedTensor) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(qt.data.numpy(), Q(qt.qtype)).astype(np.float64)).reshape(qt.shape)


def tolerance(x: torch.Tensor, w: torch.Tensor, block: int) -> torch.Tensor:
    """Six standard deviations of the error from quantizing activations to 8 bits per ``block`` values.

    Each value moves by up to half a step of ``amax(block) / 127``, uniformly: variance step^2/12 per value,
    weighted by the squared weights it multiplies; plus the fp16 rounding of the block scales (2^-11).
    """
    x = x.double().reshape(-1, x.shape[-1])
    blocks = x.shape[1] // block
    step = x.abs().reshape(x.shape[0], blocks, block).amax(-1) / 127  # [m, blocks]
    w_sq = (w.double() ** 2).reshape(w.shape[0], blocks, block).sum(-1)  # [n, blocks]
    sigma = ((step**2 / 12) @ w_sq.T).sqrt()
    return 6 * sigma + 2**-10 * (x.abs() @ w.double().abs().T) + 1e-6


SHAPES = {t: [(17, 96), (33, 64)] if t not in K_QUANTS else [(17, 256), (9, 768)] for t in BLOCK_QTYPES}


@pytest.mark.parametrize("qtype", BLOCK_QTYPES, ids=lambda t: t.name)
def test_quant_matmul_matches_float64(level, qtype):
    for out_features, cols in SHAPES[qtype]:
        qt = make_weight(qtype, out_features, cols)
        w = reference_dense(qt)
        for m in (1, 3, 16, 67):
            x = torch.randn(m, cols, generator=torch.Generator().manual_seed(m))
            got = quant_matmul(x, qt)
            assert got.dtype == torch.float32 and got.shape == (m, out_features)
            expected = x.double() @ w.T
            err = (got.double() - expected).abs()
            bound = tolerance(x, w, ACTIVATION_BLOCK[qtype])
            assert bool((err <= bound).all()), f"{qtype.name} m={m}: worst error/bound {(err / bound).max():.3f}"
            assert err.max() > 0 or level == "reference"  # the kernels quantize activations: never bit-exact


@pytest.mark.parametrize("qtype", BLOCK_QTYPES, ids=lambda t: t.name)
def test_dequantize_equals_gguf(level, qtype):
    qt = make_weight(qtype, 7, 512 if qtype in K_QUANTS else 96)
    w = reference_dense(qt)
    torch.testing.assert_close(dequantize(qt).double(), w, rtol=1e-6, atol=1e-7)
    rows = torch.tensor([6, 0, 3, 3])
    torch.testing.assert_close(dequantize(qt, rows).double(), w[rows], rtol=1e-6, atol=1e-7)
    embedding = QuantEmbedding(qt)
    looked_up = embedding(torch.tensor([[2, 5], [0, 6]]))
    assert looked_up.shape == (2, 2, qt.shape[1])
    torch.testing.assert_close(looked_up.double(), w[torch.tensor([[2, 5], [0, 6]])], rtol=1e-6, atol=1e-7)


def test_quant_linear_batches_bias_and_bfloat16(level):
    qt = make_weight(Q.Q4_K, 19, 512)
    bias = torch.randn(19)
    layer = QuantLinear(qt, bias)
    assert (layer.in_features, layer.out_features, layer.weight_bytes) == (512, 19, 19 * 2 * 144)
    x = torch.randn(2, 3, 512)
    w = reference_dense(qt)
    got = layer(x)
    assert got.shape == (2, 3, 19)
    err = (got.double() - (x.double() @ w.T + bias.double())).abs()
    assert bool((err <= tolerance(x, w, 256).reshape(2, 3, 19)).all())
    x16 = x.to(torch.bfloat16)
    got16 = layer(x16)
    assert got16.dtype == torch.bfloat16
    err16 = (got16.double() - (x16.double() @ w.T + bias.double())).abs()
    assert bool((err16 <= 2 * tolerance(x16.float(), w, 256).reshape(2, 3, 19) + 0.01 * got.abs().double()).all())


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16], ids=lambda t: t.name)
def test_float_rows(level, qtype):
    dense = torch.randn(5, 64)
    dtype = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}[qtype]
    rows = dense.to(dtype)
    qt = QuantizedTensor(rows.view(torch.uint8), qtype, (5, 64))
    x = torch.randn(3, 64)
    torch.testing.assert_close(quant_matmul(x, qt), x @ rows.float().T)
    torch.testing.assert_close(dequantize(qt, torch.tensor([4])), rows[4:].float())


def test_op_inside_torch_compile(level):
    """The ops trace through ``torch.compile`` (fullgraph) and give the eager result."""
    if level == "reference":
        pytest.skip("the no-compiler fallback runs gguf's numpy code, which torch.compile cannot trace (nor compile)")
    qt = make_weight(Q.Q4_0, 24, 64)
    layer = QuantLinear(qt)
    embedding = QuantEmbedding(make_weight(Q.Q8_0, 10, 64, seed=1))

    def forward(ids: torch.Tensor) -> torch.Tensor:
        return layer(torch.nn.functional.silu(embedding(ids)))

    ids = torch.tensor([1, 7, 3])
    compiled = torch.compile(forward, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(ids), forward(ids), rtol=0, atol=0)


def test_bad_inputs_name_the_problem(level):
    qt = make_weight(Q.Q4_0, 8, 64)
    with pytest.raises(QuantFormatError, match="float32 or bfloat16.*float64"):
        quant_matmul(torch.randn(2, 64, dtype=torch.float64), qt)
    with pytest.raises(QuantFormatError, match="64"):
        quant_matmul(torch.randn(2, 96), qt)
    with pytest.raises(QuantFormatError, match="in_features.*48.*multiple of 32"):
        QuantizedTensor(torch.zeros(8, 27, dtype=torch.uint8), Q.Q4_0, (8, 48))
    with pytest.raises(QuantFormatError, match="unsupported quantization type IQ2_XXS"):
        QuantizedTensor(torch.zeros(8, 66, dtype=torch.uint8), Q.IQ2_XXS, (8, 256))
    with pytest.raises(QuantFormatError, match=r"needs data of shape \(8, 36\)"):
        QuantizedTensor(torch.zeros(8, 18, dtype=torch.uint8), Q.Q4_0, (8, 64))
    with pytest.raises(QuantFormatError, match="uint8"):
        QuantizedTensor(torch.zeros(8, 36, dtype=torch.int8), Q.Q4_0, (8, 64))
    with pytest.raises(QuantFormatError, match="out of range"):
        dequantize(qt, torch.tensor([8]))
    with pytest.raises(QuantFormatError, match="bias"):
        QuantLinear(qt, torch.zeros(7))


def test_native_op_checks_its_inputs(level):
    if level == "reference":
        pytest.skip("the reference path has no native op")
    qt = make_weight(Q.Q4_0, 8, 64)
    index = ggml_kernels.level_index()
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.sglite.ggml_quant_matmul(torch.randn(2, 64).double(), qt.data, qt.qtype, 8, index)
    with pytest.raises(RuntimeError, match="weight rows hold 36 bytes; 96 columns need 54"):
        torch.ops.sglite.ggml_quant_matmul(torch.randn(2, 96), qt.data, qt.qtype, 8, index)
    with pytest.raises(RuntimeError, match="row index 9 out of range"):
        torch.ops.sglite.ggml_dequantize(qt.data, torch.tensor([9]), qt.qtype, 64, index)
    with pytest.raises(RuntimeError, match="no kernels"):
        torch.ops.sglite.ggml_quant_matmul(torch.randn(2, 64), qt.data, int(Q.IQ4_NL), 8, index)


def test_levels_are_detected_and_forced():
    assert ggml_kernels.KERNEL_LEVELS == CPU_KERNEL_LEVELS  # the config validates the same names
    assert ggml_build.cpu_levels(set()) == ("portable",)
    assert ggml_build.cpu_levels({"avx2", "fma"}) == ("portable",)  # no F16C: not the avx2 build
    assert "portable" in ggml_kernels.available_levels()
    with pytest.raises(ValueError, match="cpu_kernel_level must be one of"):
        set_kernel_level("sse9")
    with pytest.raises(ValueError, match="cpu_kernel_level"):
        EngineConfig(cpu_kernel_level="fastest")
    if "avx512" not in ggml_kernels.available_levels():
        with pytest.raises(ggml_kernels.KernelLevelError, match="avx512.*lacks"):
            set_kernel_level("avx512")
    assert set_kernel_level("auto") == ggml_kernels.available_levels()[0]
    assert set(SUPPORTED_QTYPES) >= set(BLOCK_QTYPES)
    assert math.prod(make_weight(Q.Q8_0, 2, 32).data.shape) == 2 * 34
