"""Prefill-bound workload (prefix_reuse's few-shot prompts, radix cache off): blocked vs padded prefill
attention vs the transformers generate loop, interleaved round by round in one process.

    python benchmarks/prefill_attention.py [--questions 4] [--rounds 3] [--threads 1]

On a shared machine the load changes from minute to minute, so the three rows take turns (one
round = each row once) and the table shows min / median over the rounds. "padded" is the path
every device used before ``runtime/models/prefill_attention.py`` (one padded, masked SDPA call per
group, K/V heads expanded for GQA); the engine is the same object, only
``attention.BLOCKED_EXTEND_DEVICES`` changes between rows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, engine_options, header, load_hf, min_median, setup, timed  # noqa: E402
from prefix_reuse import few_shot_prompts, run_transformers  # noqa: E402

import sglite  # noqa: E402
from sglite.runtime.models import attention  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    add_common_args(parser, repeat=1)
    args = parser.parse_args(argv)
    model, device, dtype = setup(args)
    if args.quick:
        args.questions, args.examples, args.max_new_tokens, args.rounds = 2, 2, 4, 1
    hf, tok = load_hf(model, device, dtype)
    prompts = few_shot_prompts(tok, args.examples, args.questions)
    params = {"max_new_tokens": args.max_new_tokens, "temperature": 0, "ignore_eos": True}
    blocked = attention.BLOCKED_EXTEND_DEVICES
    times: dict[str, list[float]] = {"sglite, blocked prefill": [], "sglite, padded prefill": [], "transformers loop": []}
    outputs: dict[str, list] = {}
    with sglite.Engine(model, disable_radix_cache=True, **engine_options(args, device, dtype)) as engine:
        engine.generate(prompts[0][:50], {"max_new_tokens": 1})  # warm-up off the clock
        try:
            for _ in range(args.rounds):
                for name, devices in (("sglite, blocked prefill", blocked), ("sglite, padded prefill", frozenset())):
                    attention.BLOCKED_EXTEND_DEVICES = devices
                    t, outs = timed(lambda: engine.generate(prompts, params), 1)
                    times[name] += t
                    outputs[name] = [o["output_ids"] for o in outs]
                t, _, outputs["transformers loop"] = run_transformers(hf, tok, prompts, args.max_new_tokens, device, 1)
                times["transformers loop"] += t
        finally:
            attention.BLOCKED_EXTEND_DEVICES = blocked
    reference = statistics.median(times["transformers loop"])
    n_tok = len(tok.encode(prompts[0]))
    print(header(f"prefill_attention: {Path(model).name}, {args.questions} questions, ~{n_tok} prompt tokens each, "
                 f"{args.max_new_tokens} new tokens, radix cache off", device, dtype, args.rounds))
    print(f"| {'setup':<24} | {'wall s':>15} | {'transformers / this':>19} |")
    print(f"|{'-' * 26}|{'-' * 17}|{'-' * 21}|")
    for name, t in times.items():
        print(f"| {name:<24} | {min_median(t):>15} | {reference / statistics.median(t):18.2f}x |")
    same = all(o == outputs["transformers loop"] for o in outputs.values())
    print(f"greedy outputs identical across all three: {same}")


if __name__ == "__main__":
    main()
