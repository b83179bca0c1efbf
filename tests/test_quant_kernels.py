"""Quantized CPU kernels (llama.cpp's dot products per ISA level) against dequantize-then-matmul in float64.

Every test runs at every level this CPU executes (levels it lacks are skipped with the missing flags named),
so an AVX512 machine also checks the AVX2 and portable builds; the reference path (what runs where nothing
builds) is a level of its own here.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

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


def test_no_build_falls_back_with_one_warning(monkeypatch, caplog):
    """Where no level builds, ``auto`` warns once and quantized layers still compute (gguf's reference path)."""

    def cannot_build(level: str) -> int:
        raise ggml_build.KernelBuildError(f"no compiler for {level} (simulated)")

    monkeypatch.setattr(ggml_kernels, "_load_level", cannot_build)
    monkeypatch.setattr(ggml_kernels._State, "warned", False)
    with caplog.at_level("WARNING", logger=ggml_kernels.__name__):
        assert set_kernel_level("auto") == "reference"
        assert set_kernel_level("auto") == "reference"
        qt = make_weight(Q.Q8_0, 5, 64)
        x = torch.randn(2, 64)
        torch.testing.assert_close(quant_matmul(x, qt).double(), x.double() @ reference_dense(qt).T, rtol=1e-5, atol=1e-5)
    warnings = [r for r in caplog.records if "did not build" in r.getMessage()]
    assert len(warnings) == 1 and "simulated" in warnings[0].getMessage()
    with pytest.raises(ggml_kernels.KernelLevelError, match="portable kernels did not build.*simulated"):
        set_kernel_level("portable")
    monkeypatch.undo()
    assert set_kernel_level("auto") == ggml_kernels.available_levels()[0]


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_K], ids=lambda t: t.name)
def test_packed_layers(level, qtype):
    """Q4_0 / Q4_K layers repack for llama.cpp's 8-row gemv/gemm kernels on the x86 levels, and agree with vec_dot."""
    shapes = ((24, 96), (40, 2048), (17, 64)) if qtype == Q.Q4_0 else ((24, 256), (16, 2048), (17, 512))
    for out_features, cols in shapes:
        qt = make_weight(qtype, out_features, cols, seed=out_features)
        layer = QuantLinear(qt)
        packs = level in ("avx2", "avx512") and out_features % 8 == 0
        assert (layer.packed is not None) == packs
        if packs:
            assert layer.packed.shape == qt.data.shape and not torch.equal(layer.packed, qt.data)
        w = reference_dense(qt)
        for m in (1, 3, 4, 5, 16, 67):
            x = torch.randn(m, cols, generator=torch.Generator().manual_seed(m))
            got = layer(x)
            err = (got.double() - x.double() @ w.T).abs()
            assert bool((err <= tolerance(x, w, ACTIVATION_BLOCK[qtype])).all()), f"{out_features}x{cols} m={m}"
            if m < 32:  # the same q8_0 activations and integer dot products as the unpacked kernel
                torch.testing.assert_close(got, quant_matmul(x, qt), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def real_gguf_tensors(real_model_path):
    """The default GGUF's tensors by name (parsed once: gguf's reader reads the whole tokenizer too)."""
    return {t.name: t for t in gguf.GGUFReader(real_model_path).tensors}


@pytest.mark.slow  # gguf parses the whole file, tokenizer included (~9 s on 2 cores)
def test_real_gguf_tensors_read_in_place(level, real_gguf_tensors):
    """The default model's own tensors, as read-only views of the memory-mapped file: Q4_1 layers and the Q8_0
    embedding table (looked up and used as the tied head) match gguf's dequantization in float64."""
    tensors = real_gguf_tensors

    def view(name: str) -> QuantizedTensor:
        t = tensors[name]
        with warnings.catch_warnings():  # the mapping is read-only, and the kernels never write to it
            warnings.simplefilter("ignore", UserWarning)
            data = torch.from_numpy(t.data)
        return QuantizedTensor(data, t.tensor_type, (int(t.shape[1]), int(t.shape[0])))

    down = view("blk.0.ffn_down.weight")
    assert down.name == "Q4_1" and down.shape == (576, 1536) and not tensors["blk.0.ffn_down.weight"].data.flags.writeable
    w = reference_dense(down)
    x = torch.randn(3, 1536, generator=torch.Generator().manual_seed(0))
    err = (QuantLinear(down)(x).double() - x.double() @ w.T).abs()
    assert bool((err <= tolerance(x, w, 32)).all())

    embedding = QuantEmbedding(view("token_embd.weight"))
    ids = torch.tensor([0, 1, 4000, 49151])
    table = reference_dense(QuantizedTensor(embedding.weight.data[ids], embedding.weight.qtype, (4, 576)))
    torch.testing.assert_close(embedding(ids).double(), table, rtol=1e-6, atol=1e-7)
    hidden = torch.randn(2, 576, generator=torch.Generator().manual_seed(1))
    logits = quant_matmul(hidden, embedding.weight)
    assert logits.shape == (2, 49152)
    rows = torch.arange(0, 49152, 997)  # a sample of the head's rows, checked in float64
    sample = reference_dense(QuantizedTensor(embedding.weight.data[rows], embedding.weight.qtype, (len(rows), 576)))
    err = (logits[:, rows].double() - hidden.double() @ sample.T).abs()
    assert bool((err <= tolerance(hidden, sample, 32)).all())


def _mapping_rss_kib(path) -> int:
    """Resident KiB of this process's mappings of ``path`` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:
            inside = fields[-1] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def test_repacked_layer_releases_its_mapped_source(level, tmp_path):
    """A layer that repacks leaves its memory-mapped source blocks out of RSS (file + packed copy would double
    the weights' memory); the blocks still read back intact."""
    if level not in ("avx2", "avx512") or not Path("/proc/self/smaps").exists():
        pytest.skip("only the x86 levels repack (and only Linux reports a mapping's RSS)")
    qt = make_weight(Q.Q4_0, 512, 4096)  # 1.1 MiB of blocks
    path = tmp_path / "weights.bin"
    qt.data.numpy().tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r", shape=tuple(qt.data.shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only: the kernels never write to it
        view = QuantizedTensor(torch.from_numpy(mapped), Q.Q4_0, qt.shape)
    assert int(mapped.sum(dtype=np.int64)) > 0  # every page resident
    before = _mapping_rss_kib(path)
    layer = QuantLinear(view)
    assert layer.packed is not None
    after = _mapping_rss_kib(path)
    assert before >= 1000 and after < before / 4, (before, after)
    assert torch.equal(torch.from_numpy(np.array(mapped)), qt.data)


@pytest.mark.slow  # an inductor compile: tens of seconds on 2 cores
def test_layers_inside_inductor_compile():
    """With inductor (the engine's backend), packed and unpacked layers run as the same ops as in eager."""
    assert set_kernel_level("auto") != "reference"
    packed, plain = QuantLinear(make_weight(Q.Q4_K, 16, 256)), QuantLinear(make_weight(Q.Q6_K, 24, 256), torch.randn(24))

    def forward(x: torch.Tensor) -> torch.Tensor:
        return plain(torch.relu(packed(x)).repeat(1, 16))

    x = torch.randn(3, 256)
    compiled = torch.compile(forward, fullgraph=True)
    torch.testing.assert_close(compiled(x), forward(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("level_name", ggml_build.LEVELS)
def test_every_level_builds_and_exports_one_symbol(level_name):
    """Each level compiles on any x86 machine with a compiler (avx512 too, though only run where the CPU has it)
    and exports only its kernel table, so levels and a libggml loaded by someone else never clash."""
    import platform
    import shutil
    import subprocess

    if level_name != "portable" and platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"the {level_name} kernels are x86 code")
    if shutil.which("nm") is None:
        pytest.skip("binutils' nm is not installed")
    path = ggml_build.build(level_name)  # cached after scripts/bootstrap.sh; compiles otherwise
    listing = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True, check=True)
    exported = {line.split()[-1] for line in listing.stdout.splitlines() if line.split()[1:2] == ["T"]}
    assert exported == {"sg_ggml_kernels"}


def test_requested_level_is_checked_now_and_loaded_by_the_first_layer(level):
    """``request_kernel_level`` (the engine's call) rejects a level the CPU lacks at once, and the next
    quantized layer runs the requested level."""
    if level == "reference":
        pytest.skip("the reference path is not a requestable level")
    from sglite.runtime.kernels.ggml_kernels import request_kernel_level

    request_kernel_level("auto")
    set_kernel_level("auto")
    request_kernel_level(level)
    assert ggml_kernels._State.level is None  # nothing loaded until a quantized layer needs it
    QuantLinear(make_weight(Q.Q8_0, 8, 32))
    assert ggml_kernels.kernel_level() == level
    with pytest.raises(ggml_kernels.KernelLevelError, match="one of"):
        request_kernel_level("avx9000")
    request_kernel_level("auto")


def test_engine_rejects_a_level_this_cpu_lacks(llama_path):
    if "avx512" in ggml_kernels.available_levels():
        pytest.skip("this CPU runs every level")
    from sglite.runtime.engine import Engine

    with pytest.raises(ggml_kernels.KernelLevelError, match="avx512.*lacks"):
        Engine(llama_path, cpu_kernel_level="avx512", max_total_tokens=64)
    assert ggml_kernels._State.requested == "auto"  # the rejected request left the process's choice alone
