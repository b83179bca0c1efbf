"""Few-shot workload: radix cache on vs off vs a plain transformers generate loop.

    python benchmarks/prefix_reuse.py [--model PATH] [--questions 64] [--max-new-tokens 8] [--device cpu --dtype float32]
    python benchmarks/prefix_reuse.py --quick          # 8 questions, 2 examples, 4 new tokens, 2 repetitions

8 shared examples of ~150 tokens each form one long prefix; 64 questions follow it. Every row runs on the
same device and dtype and generates greedily to the same fixed length; the cache is flushed before each
repetition, so every row starts cold. Prints wall time (min / median), prompt tokens actually computed,
and whether the greedy outputs agree.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, engine_options, header, load_hf, min_median, setup, sync, timed  # noqa: E402

import sglite  # noqa: E402


def few_shot_prompts(tokenizer, n_examples: int, n_questions: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and 3 <= len(w) <= 8)[:800]
    shots = []
    for i in range(n_examples):
        body = []
        while len(tokenizer.encode(" ".join(body))) < 140:
            body.append(rng.choice(words))
        shots.append(f"Question {i}: {' '.join(body)}\nAnswer: {rng.choice(words)}\n")
    prefix = "".join(shots)
    return [f"{prefix}Question: {' '.join(rng.choice(words) for _ in range(12))}\nAnswer:" for _ in range(n_questions)]


def run_engine(model: str, prompts: list[str], params: dict, repeat: int, **options) -> tuple[list[float], int, list]:
    with sglite.Engine(model, **options) as engine:
        engine.generate(prompts[0][:50], {"max_new_tokens": 1})  # warm-up off the clock

        def once():
            engine.flush_cache()  # every repetition starts cold
            before = engine.get_stats()["prefill_tokens_computed"]
            outs = engine.generate(prompts, params)
            return engine.get_stats()["prefill_tokens_computed"] - before, [o["output_ids"] for o in outs]

        times, (computed, outs) = timed(once, repeat)
    return times, computed, outs


def run_transformers(model, tok, prompts: list[str], max_new_tokens: int, device: str, repeat: int):
    def one(p: str) -> list[int]:
        ids = tok(p, return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
        sync(device)
        return gen[0, ids.shape[1]:].tolist()

    one(prompts[0])  # warm-up off the clock, as for the engine
    times, outs = timed(lambda: [one(p) for p in prompts], repeat)
    computed = sum(len(tok.encode(p)) for p in prompts)
    return times, computed, outs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    add_common_args(parser)
    args = parser.parse_args(argv)
    model, device, dtype = setup(args)
    if args.quick:
        args.questions, args.examples, args.max_new_tokens = 8, 2, 4
    hf, tok = load_hf(model, device, dtype)
    prompts = few_shot_prompts(tok, args.examples, args.questions)
    params = {"max_new_tokens": args.max_new_tokens, "temperature": 0, "ignore_eos": True}
    engine = engine_options(args, device, dtype)
    rows = {
        "sglite, radix cache on": run_engine(model, prompts, params, args.repeat, **engine),
        "sglite, radix cache off": run_engine(model, prompts, params, args.repeat, disable_radix_cache=True, **engine),
        "transformers generate loop": run_transformers(hf, tok, prompts, args.max_new_tokens, device, args.repeat),
    }
    on = statistics.median(rows["sglite, radix cache on"][0])
    same = all(r[2] == rows["sglite, radix cache on"][2] for r in rows.values())
    n_tok = len(tok.encode(prompts[0]))
    print(header(f"prefix_reuse: {Path(model).name}, {args.questions} questions, ~{n_tok} prompt tokens each "
                 f"({args.examples} shared examples), {args.max_new_tokens} new tokens", device, dtype, args.repeat))
    print(f"| {'setup':<28} | {'wall s':>15} | {'prompt tokens computed':>22} | {'time / cache on':>15} |")
    print(f"|{'-' * 30}|{'-' * 17}|{'-' * 24}|{'-' * 17}|")
    for name, (times, computed, _) in rows.items():
        print(f"| {name:<28} | {min_median(times):>15} | {computed:22d} | {statistics.median(times) / on:14.1f}x |")
    print(f"greedy outputs identical across all three: {same}")


if __name__ == "__main__":
    main()
