"""Few-shot workload: radix cache on vs off vs a plain transformers generate loop.

    python benchmarks/prefix_reuse.py [--model PATH] [--questions 64] [--max-new-tokens 8]

8 shared examples of ~150 tokens each form one long prefix; 64 questions follow it. Prints wall
time, prompt tokens actually computed, and the ratios, measured side by side in one run.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

import sglite
from sglite.runtime.tiny_model import build_tiny_model


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


def run_engine(model: str, prompts: list[str], params: dict, **options) -> tuple[float, int, list]:
    with sglite.Engine(model, **options) as engine:
        engine.generate(prompts[0][:50], {"max_new_tokens": 1})  # warm-up off the clock
        engine.flush_cache()
        before = engine.get_stats()["prefill_tokens_computed"]
        start = time.perf_counter()
        outs = engine.generate(prompts, params)
        elapsed = time.perf_counter() - start
        computed = engine.get_stats()["prefill_tokens_computed"] - before
    return elapsed, computed, [o["output_ids"] for o in outs]


def run_transformers(model: str, prompts: list[str], max_new_tokens: int) -> tuple[float, int, list]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    start, computed, outs = time.perf_counter(), 0, []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        computed += ids.shape[1]
        gen = hf.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                          eos_token_id=None)
        outs.append(gen[0, ids.shape[1]:].tolist())
    return time.perf_counter() - start, computed, outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()
    model = args.model or str(build_tiny_model("llama"))
    from transformers import AutoTokenizer

    prompts = few_shot_prompts(AutoTokenizer.from_pretrained(model), args.examples, args.questions)
    params = {"max_new_tokens": args.max_new_tokens, "temperature": 0, "ignore_eos": True}
    rows = {
        "sglite, radix cache on": run_engine(model, prompts, params),
        "sglite, radix cache off": run_engine(model, prompts, params, disable_radix_cache=True),
        "transformers generate loop": run_transformers(model, prompts, args.max_new_tokens),
    }
    on = rows["sglite, radix cache on"]
    same = all(r[2] == on[2] for r in rows.values())
    n_tok = len(AutoTokenizer.from_pretrained(model).encode(prompts[0]))
    print(f"\nprefix_reuse: {args.questions} questions, ~{n_tok} prompt tokens each, {args.max_new_tokens} new tokens; "
          f"torch threads {torch.get_num_threads()}")
    print(f"| {'setup':<28} | {'wall s':>7} | {'prompt tokens computed':>22} | {'speed-up of cache on':>20} |")
    print(f"|{'-' * 30}|{'-' * 9}|{'-' * 24}|{'-' * 22}|")
    for name, (elapsed, computed, _) in rows.items():
        print(f"| {name:<28} | {elapsed:7.2f} | {computed:22d} | {elapsed / on[0]:19.1f}x |")
    print(f"greedy outputs identical across all three: {same}")


if __name__ == "__main__":
    main()
