"""Quantized matmul kernels per ggml format and ISA level, side by side with dequantize + ``F.linear``.

Decode rows (1 / 4 / 16) report weight GB/s: each call reads the whole weight once, so this is the share of
memory bandwidth the kernel reaches (weights are cycled through copies larger than the last-level cache, so
they come from DRAM as in a model's forward). 512 rows (prefill) report GFLOP/s. Reference rows: torch's
dense float32 ``F.linear`` (the bandwidth ceiling at 4 bytes a weight) and torch's int4 CPU kernel
(``_weight_int4pack_mm_for_cpu``, what torchao's int4 CPU layout calls, bfloat16 activations).

    python benchmarks/quant_matmul.py --threads 1                 # every format, every level this CPU runs
    python benchmarks/quant_matmul.py --quick --formats Q4_0 Q4_K
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import gguf
import torch
import torch.nn.functional as F

from sglite.runtime.kernels import ggml_build, ggml_kernels
from sglite.runtime.kernels.quant_linear import QuantizedTensor, dequantize, quant_matmul, set_kernel_level

Q = gguf.GGMLQuantizationType
FORMATS = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
SHOWN_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile")


def cpu_header() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = " ".join(f for f in SHOWN_FLAGS if f in ggml_build.cpu_flags()) or "none of " + " ".join(SHOWN_FLAGS)
    return f"CPU: {model}; ISA flags: {flags}; torch threads {torch.get_num_threads()}; torch {torch.__version__}"


def make_weights(qtype: Q, rows: int, cols: int, copies: int) -> list[QuantizedTensor]:
    """``copies`` copies of one random weight in ``qtype`` (K-quants by llama.cpp's reference quantizer):
    the same bytes at different addresses, so a pass over them cannot be served by the cache."""
    dense = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    if qtype.name.endswith("_K"):
        blocks = torch.ops.sglite.ggml_quantize_ref(dense, int(qtype), ggml_build.LEVELS.index("portable"))
    else:
        blocks = torch.from_numpy(gguf.quants.quantize(dense.numpy(), qtype))
    return [QuantizedTensor(blocks.clone(), qtype, (rows, cols)) for _ in range(copies)]


CLOCK = time.perf_counter


def seconds_per_call(fn, weights, repeat: int) -> list[float]:
    """Per-call seconds of ``fn(w)`` over the weight copies, one sample per pass, after a warm-up pass."""
    for w in weights[:2]:
        fn(w)
    samples = []
    for _ in range(repeat):
        start = CLOCK()
        for w in weights:
            fn(w)
        samples.append((CLOCK() - start) / len(weights))
    return samples


def cell(samples: list[float], work: float, unit: float) -> str:
    """``best / median`` rate in the unit (GB/s or GFLOP/s) for ``work`` bytes or flops per call."""
    return f"{work / min(samples) / unit:6.1f} / {work / statistics.median(samples) / unit:6.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=5632, help="out_features of the weight (default: TinyLlama's FFN)")
    parser.add_argument("--cols", type=int, default=2048, help="in_features of the weight")
    parser.add_argument("--formats", nargs="*", default=FORMATS, choices=FORMATS)
    parser.add_argument("--levels", nargs="*", default=None, help="default: every level this CPU runs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--prefill-rows", type=int, default=512)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: the process's CPU seconds (one thread only; immune to other processes taking the "
                             "core, as on a shared machine); wall: elapsed seconds")
    parser.add_argument("--quick", action="store_true", help="a 1024x1024 weight, 2 repetitions: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.cols, args.repeat = 1024, 1024, 2
    torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if args.threads != 1:
            parser.error("--clock cpu sums every thread's CPU time: use it with --threads 1")
        global CLOCK
        CLOCK = time.process_time
    set_kernel_level("auto")  # loads the op library (and, for the K-quants' test data, the portable level below)
    ggml_kernels._load_level("portable")
    levels = args.levels or list(ggml_kernels.available_levels())
    rows, cols = args.rows, args.cols
    decode_rows = (1, 4, 16)
    print(f"quantized matmul, weight {rows}x{cols}; decode cells GB/s of weight read, prefill cells GFLOP/s; "
          f"best / median of {args.repeat}, {args.clock} clock")
    print(cpu_header())
    print(f"command: python benchmarks/quant_matmul.py --threads {args.threads} --rows {rows} --cols {cols} "
          f"--clock {args.clock}")
    print()
    print("| format | kernel | bytes/weight | " + " | ".join(f"{m} rows GB/s" for m in decode_rows)
          + f" | {args.prefill_rows} rows GFLOP/s |")
    print("|---|---|---|" + "---|" * (len(decode_rows) + 1))

    def row(name: str, kernel: str, weights, fn, nbytes: int) -> None:
        cells = []
        for m in decode_rows:
            x = torch.randn(m, cols)
            cells.append(cell(seconds_per_call(lambda w: fn(x, w), weights, args.repeat), nbytes, 1e9))
        x = torch.randn(args.prefill_rows, cols)
        prefill = seconds_per_call(lambda w: fn(x, w), weights[:1] * 2, max(2, args.repeat // 2))
        cells.append(cell(prefill, 2.0 * args.prefill_rows * rows * cols, 1e9))
        print(f"| {name} | {kernel} | {nbytes / (rows * cols):.3f} | " + " | ".join(cells) + " |", flush=True)

    # enough copies that a pass reads more than 64 MB: the weights come from DRAM, not the last-level cache
    dense_copies = max(2, (64 << 20) // (rows * cols * 4) + 1)
    dense = [torch.randn(rows, cols) for _ in range(dense_copies)]
    row("F32", "torch F.linear", dense, lambda x, w: F.linear(x, w), rows * cols * 4)
    del dense
    if cols % 32 == 0 and rows % 16 == 0:
        codes = torch.randint(0, 16, (rows, cols), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        scale_zero = torch.randn(cols // 32, rows, 2).to(torch.bfloat16)
        int4 = [(packed.clone(), scale_zero) for _ in range(max(2, (64 << 20) // (rows * cols // 2) + 1))]
        row("int4 g32", "torch _weight_int4pack_mm (bf16 x)", int4,
            lambda x, w: torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), w[0], 32, w[1]),
            rows * cols // 2 + scale_zero.numel() * 2)
        del int4

    for name in args.formats:
        qtype = Q[name]
        block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = rows * cols // block_size * block_bytes
        weights = make_weights(qtype, rows, cols, max(2, (64 << 20) // nbytes + 1))
        for level in levels:
            set_kernel_level(level)
            row(name, f"ggml {level}", weights, quant_matmul, nbytes)
        set_kernel_level("auto")
        row(name, "dequantize + F.linear", weights[:2], lambda x, w: F.linear(x, dequantize(w)), nbytes)
        del weights


if __name__ == "__main__":
    main()
