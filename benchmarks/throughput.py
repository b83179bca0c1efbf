"""Throughput: 32 concurrent requests x 64 new tokens, engine vs transformers; a mixed prefill +
decode workload; and single-stream decode.

    python benchmarks/throughput.py [--model PATH] [--requests 32] [--max-new-tokens 64] [--long-prompts 8]

Rows: the engine (continuous batching), sequential transformers ``generate``, batched (left-padded)
transformers ``generate``. The mixed table adds ``--long-prompts`` prompts of ~1000 tokens behind
the short ones, so for many steps one batch holds a 512-token prefill chunk next to the decode
steps of the others. Then single-stream decode tokens/s next to the memory-bandwidth bound
(model bytes / measured copy bandwidth).
"""

from __future__ import annotations

import argparse
import time

import torch

import sglite
from sglite.runtime.tiny_model import build_tiny_model

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


def engine_throughput(model: str, prompts: list[str], n: int, **options) -> tuple[float, int]:
    with sglite.Engine(model, **options) as engine:
        engine.generate("warm up", {"max_new_tokens": 2})
        start = time.perf_counter()
        outs = engine.generate(prompts, {"max_new_tokens": n, "temperature": 0, "ignore_eos": True})
        return time.perf_counter() - start, sum(len(o["output_ids"]) for o in outs)


def engine_single_stream(model: str, n: int) -> float:
    with sglite.Engine(model) as engine:
        engine.generate("warm up", {"max_new_tokens": 2})
        start = time.perf_counter()
        out = engine.generate("def main():", {"max_new_tokens": n, "temperature": 0, "ignore_eos": True})
        return len(out["output_ids"]) / (time.perf_counter() - start)


def hf_sequential(model, tok, prompts: list[str], n: int) -> tuple[float, int]:
    start, total = time.perf_counter(), 0
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        total += gen.shape[1] - ids.shape[1]
    return time.perf_counter() - start, total


def hf_batched(model, tok, prompts: list[str], n: int) -> tuple[float, int]:
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    start = time.perf_counter()
    gen = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return time.perf_counter() - start, (gen.shape[1] - enc.input_ids.shape[1]) * len(prompts)


def copy_bandwidth(nbytes: int = 256 * 2**20) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    # a copy reads and writes every byte
    return 2 * nbytes * 5 / (time.perf_counter() - start)


def print_table(rows: dict[str, tuple[float, int]], baseline: str) -> None:
    base_tps = rows[baseline][1] / rows[baseline][0]
    print(f"| {'setup':<36} | {'wall s':>7} | {'tokens/s':>9} | {'vs sequential':>13} |")
    print(f"|{'-' * 38}|{'-' * 9}|{'-' * 11}|{'-' * 15}|")
    for name, (elapsed, tokens) in rows.items():
        tps = tokens / elapsed
        print(f"| {name:<36} | {elapsed:7.2f} | {tps:9.1f} | {tps / base_tps:12.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--long-prompts", type=int, default=8, help="long prompts in the mixed workload (0: skip)")
    args = parser.parse_args()
    model_path = args.model or str(build_tiny_model("llama"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    prompts = [PROMPTS[i % len(PROMPTS)] + f" # {i}" for i in range(args.requests)]
    n = args.max_new_tokens
    rows = {
        "sglite engine (continuous batching)": engine_throughput(model_path, prompts, n),
        "transformers generate, sequential": hf_sequential(hf, tok, prompts, n),
        "transformers generate, padded batch": hf_batched(hf, tok, prompts, n),
    }
    print(f"\nthroughput: {args.requests} requests x {n} new tokens; torch threads {torch.get_num_threads()}")
    print_table(rows, "transformers generate, sequential")

    # Small models on few cores lose more to thread-pool overhead than they gain from a second thread;
    # the same three rows with one torch thread each (Engine(num_threads=1)).
    default_threads = torch.get_num_threads()
    one_thread = {
        "sglite engine, num_threads=1": engine_throughput(model_path, prompts, n, num_threads=1),
        "transformers sequential, 1 thread": hf_sequential(hf, tok, prompts, n),
        "transformers padded batch, 1 thread": hf_batched(hf, tok, prompts, n),
    }
    torch.set_num_threads(default_threads)
    print("\nthe same with torch threads 1")
    print_table(one_thread, "transformers sequential, 1 thread")

    if args.long_prompts:
        mixed = prompts + long_prompts(tok, args.long_prompts)
        long_tokens = sum(len(tok.encode(p)) for p in mixed[args.requests :])
        mixed_rows = {
            "sglite engine (continuous batching)": engine_throughput(model_path, mixed, n),
            "transformers generate, sequential": hf_sequential(hf, tok, mixed, n),
        }
        print(f"\nmixed prefill + decode: the {args.requests} requests above plus {args.long_prompts} prompts of "
              f"~{long_tokens // args.long_prompts} tokens, all x {n} new tokens (tokens/s counts new tokens)")
        print_table(mixed_rows, "transformers generate, sequential")

    model_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    bandwidth = copy_bandwidth()
    bound = bandwidth / model_bytes
    single = engine_single_stream(model_path, n)
    print(f"\nsingle-stream decode: {single:.1f} tokens/s; memory-bandwidth bound {bound:.0f} tokens/s "
          f"({model_bytes / 2**20:.1f} MiB of weights at {bandwidth / 2**30:.1f} GiB/s copy bandwidth) "
          f"= {100 * single / bound:.2f}% of the bound")


if __name__ == "__main__":
    main()
