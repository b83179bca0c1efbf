"""Throughput: 32 concurrent requests x 64 new tokens, engine vs transformers; a mixed prefill +
decode workload; and single-stream decode next to the bound set by reading the weights once per token.

    python benchmarks/throughput.py [--model PATH] [--requests 32] [--max-new-tokens 64] [--long-prompts 8]
    python benchmarks/throughput.py --quick            # 4 requests x 8 tokens, 1 long prompt, 2 repetitions

Rows: the engine (continuous batching), sequential transformers ``generate``, batched (left-padded)
transformers ``generate``; all on the same device, dtype and torch threads, each warmed up once off the
clock, every row generating exactly ``--max-new-tokens`` per request. The mixed table adds
``--long-prompts`` prompts of ~1000 tokens behind the short ones, so for many steps one batch holds a
prefill chunk next to the decode steps of the others. The decode bound is measured, not assumed: the time
to read every weight of the loaded model once (a sum over the parameters, in the same process and cache
state a decode step sees), so a model that fits in the CPU cache gets the cache's speed, not DRAM's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, engine_options, header, load_hf, min_median, setup, sync, timed  # noqa: E402

import sglite  # noqa: E402

PROMPTS = [
    "def main():", "import numpy as np", "class Config:", "for key, value in", "The results show that",
    "return self.", "if __name__ ==", "with open(path) as f:",
]


def long_prompts(tok, count: int, min_tokens: int = 1000) -> list[str]:
    """Distinct prompts of at least ``min_tokens`` tokens (distinct from the start: no shared prefix)."""
    prompts = []
    for i in range(count):
        text, j = f"[{i}]", 0
        while len(tok.encode(text)) < min_tokens:
            text += "".join(f" {PROMPTS[(i + k) % len(PROMPTS)]} {j + k}" for k in range(8))
            j += 8
        prompts.append(text)
    return prompts


def engine_throughput(model: str, prompts: list[str], n: int, repeat: int, **options) -> tuple[list[float], int]:
    with sglite.Engine(model, **options) as engine:
        engine.generate(prompts[:2], {"max_new_tokens": 2})  # warm-up off the clock
        params = {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}
        times, outs = timed(lambda: engine.generate(prompts, params), repeat)
        return times, sum(len(o["output_ids"]) for o in outs)


def engine_single_stream(model: str, n: int, repeat: int, **options) -> list[float]:
    """Decode tokens/s of one request, per repetition."""
    with sglite.Engine(model, **options) as engine:
        engine.generate("warm up", {"max_new_tokens": 2})
        params = {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}
        times, _ = timed(lambda: engine.generate("def main():", params), repeat)
        return [n / t for t in times]


def hf_sequential(model, tok, prompts: list[str], n: int, device: str, repeat: int) -> tuple[list[float], int]:
    def run() -> int:
        total = 0
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids.to(device)
            with torch.no_grad():
                gen = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
            sync(device)
            total += gen.shape[1] - ids.shape[1]
        return total

    timed(lambda: hf_one(model, tok, prompts[0], 2, device), 1)  # warm-up off the clock
    times, total = timed(run, repeat)
    return times, total


def hf_one(model, tok, prompt: str, n: int, device: str) -> None:
    ids = tok(prompt, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)


def hf_batched(model, tok, prompts: list[str], n: int, device: str, repeat: int) -> tuple[list[float], int]:
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True).to(device)

    def run() -> int:
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        sync(device)
        return (gen.shape[1] - enc.input_ids.shape[1]) * len(prompts)

    hf_one(model, tok, prompts[0], 2, device)  # warm-up off the clock
    return timed(run, repeat)


def weight_read_seconds(model, device: str, repeat: int = 5) -> float:
    """Fastest time to read every parameter once (what one decode step must at least do)."""
    params = list(model.parameters())

    def read() -> None:
        with torch.no_grad():
            total = sum(p.sum() for p in params)
        float(total)
        sync(device)

    read()
    return min(timed(read, repeat)[0])


def print_table(rows: dict[str, tuple[list[float], int]], baseline: str) -> None:
    base_tps = rows[baseline][1] / statistics.median(rows[baseline][0])
    print(f"| {'setup':<36} | {'wall s':>15} | {'tokens/s (median)':>17} | {'vs sequential':>13} |")
    print(f"|{'-' * 38}|{'-' * 17}|{'-' * 19}|{'-' * 15}|")
    for name, (times, tokens) in rows.items():
        tps = tokens / statistics.median(times)
        print(f"| {name:<36} | {min_median(times):>15} | {tps:17.1f} | {tps / base_tps:12.1f}x |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--long-prompts", type=int, default=8, help="long prompts in the mixed workload (0: skip)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    model_path, device, dtype = setup(args)
    if args.quick:
        args.requests, args.max_new_tokens, args.long_prompts = 4, 8, 1
    hf, tok = load_hf(model_path, device, dtype)
    prompts = [PROMPTS[i % len(PROMPTS)] + f" # {i}" for i in range(args.requests)]
    n, repeat, engine = args.max_new_tokens, args.repeat, engine_options(args, device, dtype)
    rows = {
        "sglite engine (continuous batching)": engine_throughput(model_path, prompts, n, repeat, **engine),
        "transformers generate, sequential": hf_sequential(hf, tok, prompts, n, device, repeat),
        "transformers generate, padded batch": hf_batched(hf, tok, prompts, n, device, repeat),
    }
    print(header(f"throughput: {Path(model_path).name}, {args.requests} requests x {n} new tokens", device, dtype, repeat))
    print_table(rows, "transformers generate, sequential")

    if args.long_prompts:
        mixed = prompts + long_prompts(tok, args.long_prompts)
        long_tokens = sum(len(tok.encode(p)) for p in mixed[args.requests :])
        mixed_rows = {
            "sglite engine (continuous batching)": engine_throughput(model_path, mixed, n, repeat, **engine),
            "transformers generate, sequential": hf_sequential(hf, tok, mixed, n, device, repeat),
        }
        print(f"\nmixed prefill + decode: the {args.requests} requests above plus {args.long_prompts} prompts of "
              f"~{long_tokens // args.long_prompts} tokens, all x {n} new tokens (tokens/s counts new tokens)")
        print_table(mixed_rows, "transformers generate, sequential")

    model_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    bound = 1.0 / weight_read_seconds(hf, device)
    single = engine_single_stream(model_path, n, repeat, **engine)
    print(f"\nsingle-stream decode: {min(single):.1f} / {statistics.median(single):.1f} tokens/s (min / median); "
          f"reading all {model_bytes / 2**20:.1f} MiB of weights once takes {1e3 / bound:.2f} ms, a bound of "
          f"{bound:.0f} tokens/s: {100 * statistics.median(single) / bound:.1f}% of it")


if __name__ == "__main__":
    main()
