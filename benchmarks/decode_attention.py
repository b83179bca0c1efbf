"""Decode attention by where each sequence's keys sit in the pool: the C++ kernel next to the torch formulation.

    python benchmarks/decode_attention.py [--threads 1] [--repeat 8] [--quick]

SmolLM2-135M's attention shape (9 query heads, 3 KV heads of 64, bfloat16), one layer of a decode step, with
cold caches (a 256 MiB buffer is written before each timed call and the call reads one of 4 pools of 64k slots,
as a layer of a real step finds its rows in memory, not in cache). Layouts of each sequence's ``keys`` slots:

  interleaved  slot ``position * batch + sequence``: one slot handed out per sequence per step
  runs of N    runs of N consecutive slots per sequence, the runs of the batch interleaved (the scheduler's
               ``DECODE_SLOT_RUN`` = 64)
  contiguous   every sequence's slots consecutive (a prompt's, prefilled at once)

Cells are microseconds per layer call, min / median; "torch" is the gathered formulation the models run where
the kernel is not built (``decode_attention_gathered``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, min_median  # noqa: E402

from sglite.runtime.kernels import library as native_kernels  # noqa: E402
from sglite.runtime.kernels import paged_decode  # noqa: E402
from sglite.runtime.models.decode_attention import DecodeContext, decode_attention_gathered  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, SLOTS, POOLS = 9, 3, 64, 65536, 4


def layout(batch: int, keys: int, run: int | None) -> torch.Tensor:
    """``[batch, keys]`` slots: runs of ``run`` consecutive slots per sequence, interleaved across the batch
    (``run=1``: one slot per sequence per step; ``None``: each sequence contiguous)."""
    if run is None:
        return torch.arange(batch * keys).view(batch, keys)
    position = torch.arange(keys)[None, :]
    return ((position // run) * batch + torch.arange(batch)[:, None]) * run + position % run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="one small case, 2 repetitions")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not native_kernels.load():
        raise SystemExit("the C++ kernel did not build here (see the warning above): nothing to compare")
    cases = [(32, 46), (32, 200), (8, 1000)] if not args.quick else [(8, 40)]
    repeat = 2 if args.quick else args.repeat
    layouts = {"interleaved": 1, "runs of 16": 16, "runs of 32": 32, "runs of 64": 64, "contiguous": None}
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(torch.bfloat16)  # noqa: E731
    pools = [(rand(SLOTS, KV_HEADS, HEAD_DIM), rand(SLOTS, KV_HEADS, HEAD_DIM)) for _ in range(POOLS)]
    flush = torch.ones(64 << 20)

    def per_call(fn) -> list[float]:
        times = []
        for _ in range(repeat):
            flush.add_(1)  # evict the pools' rows from every cache level
            start = time.perf_counter()
            for k_cache, v_cache in pools:
                fn(k_cache, v_cache)
            times.append((time.perf_counter() - start) / POOLS)
        return times

    print(header("decode_attention: one layer of a bfloat16 decode step, cold caches, SmolLM2-135M's heads",
                 "cpu", "bfloat16", repeat))
    print(f"| {'batch x keys':<13} | {'layout':<12} | {'kernel us':>19} | {'torch us':>19} | {'vs interleaved':>14} |")
    print(f"|{'-' * 15}|{'-' * 14}|{'-' * 21}|{'-' * 21}|{'-' * 16}|")
    for batch, keys in cases:
        q, k, v = rand(batch, HEADS, HEAD_DIM), rand(batch, KV_HEADS, HEAD_DIM), rand(batch, KV_HEADS, HEAD_DIM)
        base = None
        for name, run in layouts.items():
            ctx = DecodeContext.from_slots(list(layout(batch, keys, run)))
            kernel = per_call(lambda kc, vc: paged_decode.paged_decode_attention(q, k, v, kc, vc, ctx.kv_index, ctx.kv_lens, 0.125))
            gathered = per_call(lambda kc, vc: decode_attention_gathered(q, k, v, kc, vc, ctx, 0.125))
            base = base or statistics.median(kernel)
            print(f"| {f'{batch} x {keys}':<13} | {name:<12} | {min_median(kernel, 1e6):>19} | {min_median(gathered, 1e6):>19} "
                  f"| {base / statistics.median(kernel):13.2f}x |")


if __name__ == "__main__":
    main()
