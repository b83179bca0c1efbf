"""Few-shot programs through ``run_batch``: radix cache on vs off, vs plain transformers ``generate``.

Every program shares a long few-shot prefix and asks its own question, the workload the radix
cache is for. Four ways to run the same 64 programs, on the same device and dtype:

* sglite, radix cache on: the prefix is computed once, then served from the cache;
* sglite, radix cache off (``disable_radix_cache=True``): continuous batching only;
* transformers, one ``model.generate`` call per program, as a plain script would do;
* transformers, one left-padded batched ``model.generate`` call for all programs.

Every row stops the same way: at the first newline (``gen(stop="\\n")``; transformers' ``stop_strings``)
or after ``--max-tokens``, EOS ignored; the generated-token column shows they did the same work. Each
side is warmed up off the clock, and the cache is flushed before every repetition.

    python benchmarks/programs.py [--model PATH] [--num 64] [--max-tokens 16] [--device cpu --dtype float32]
    python benchmarks/programs.py --quick              # 8 programs, 1 shot repeat, 8 new tokens, 2 repetitions
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, engine_options, header, load_hf, min_median, setup, sync, timed  # noqa: E402

import sglite as sgl  # noqa: E402

SHOTS = [
    ("the cat sat on the mat", "animal"),
    ("stocks fell sharply after the announcement", "finance"),
    ("the striker scored twice in the second half", "sport"),
    ("the new processor doubles the cache size", "technology"),
    ("heavy rain is expected over the weekend", "weather"),
    ("the senate passed the budget bill", "politics"),
    ("the recipe needs two cups of flour", "food"),
    ("the orchestra played a new symphony", "music"),
]


@sgl.function
def classify(s, sentence, shots):
    s += "Classify each sentence into a topic.\n\n"
    for text, topic in shots:
        s += f"Sentence: {text}\nTopic: {topic}\n\n"
    s += f"Sentence: {sentence}\nTopic:" + sgl.gen("topic", stop="\n")


def batch_arguments(num: int, repeat_shots: int) -> list[dict]:
    shots = SHOTS * repeat_shots
    return [{"sentence": f"example sentence number {i} about something", "shots": shots} for i in range(num)]


def run_sglite(model: str, batch: list[dict], max_tokens: int, repeat: int, **engine_options) -> dict:
    params = {"max_new_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    with sgl.Runtime(model, **engine_options) as runtime:
        classify.run(**batch[0], backend=runtime, **params)  # warm-up off the clock

        def once():
            runtime.flush_cache()  # the cache-on row starts cold, every repetition
            return classify.run_batch(batch, backend=runtime, **params)

        times, states = timed(once, repeat)
        metas = [st.get_meta_info("topic") for st in states]
        prompt = sum(m["prompt_tokens"] for m in metas)
        return {"times": times, "cache_hit": sum(m["cached_tokens"] for m in metas) / prompt, "prompt_tokens": prompt,
                "generated": sum(m["completion_tokens"] for m in metas), "texts": [st["topic"] for st in states]}


def run_transformers(model_dir: str, batch: list[dict], max_tokens: int, device: str, dtype: str, repeat: int) -> list[dict]:
    model, tokenizer = load_hf(model_dir, device, dtype)
    prompts = [_prompt_text(args) for args in batch]
    from transformers import StoppingCriteriaList, StopStringCriteria

    # The gen's stopping rule: the first "\n" or max_tokens; EOS does not stop it (ignore_eos). The criterion
    # is built once (building it scans the vocabulary), as the engine compiles its stop strings once.
    stop = StoppingCriteriaList([StopStringCriteria(tokenizer, ["\n"])])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rule = {"max_new_tokens": max_tokens, "do_sample": False, "stopping_criteria": stop, "eos_token_id": None,
            "pad_token_id": pad}

    def until_newline(new_ids: list[int]) -> tuple[str, int]:
        """The text before the first newline, and the tokens generated up to and including the one holding it."""
        for n in range(1, len(new_ids) + 1):
            text = tokenizer.decode(new_ids[:n], skip_special_tokens=True)
            if "\n" in text:
                return text.split("\n")[0], n
        return tokenizer.decode(new_ids, skip_special_tokens=True), len(new_ids)

    def one(text: str) -> tuple[str, int]:
        ids = tokenizer(text, return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            gen = model.generate(ids, **rule)
        sync(device)
        return until_newline(gen[0, ids.shape[1]:].tolist())

    def batched() -> tuple[list[str], int]:
        tokenizer.padding_side = "left"
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            gen = model.generate(**enc, **rule)
        sync(device)
        rows = [until_newline(row[enc.input_ids.shape[1]:].tolist()) for row in gen]
        return [t for t, _ in rows], sum(n for _, n in rows)

    one(prompts[0])  # warm-up off the clock
    loop_times, loop = timed(lambda: [one(p) for p in prompts], repeat)
    batch_times, (batch_texts, batch_generated) = timed(batched, repeat)
    return [
        {"name": "transformers generate, one call per program", "times": loop_times, "cache_hit": 0.0,
         "generated": sum(n for _, n in loop), "texts": [t for t, _ in loop]},
        {"name": "transformers generate, one padded batch", "times": batch_times, "cache_hit": 0.0,
         "generated": batch_generated, "texts": batch_texts},
    ]


def _prompt_text(args: dict) -> str:
    """The exact text ``classify`` sends before its ``gen``."""
    text = "Classify each sentence into a topic.\n\n"
    for sentence, topic in args["shots"]:
        text += f"Sentence: {sentence}\nTopic: {topic}\n\n"
    return text + f"Sentence: {args['sentence']}\nTopic:"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=64, help="programs in the batch")
    parser.add_argument("--max-tokens", type=int, default=16, help="most tokens generated per program")
    parser.add_argument("--repeat-shots", type=int, default=3, help="few-shot examples repeated to lengthen the prefix")
    parser.add_argument("--skip-transformers", action="store_true")
    add_common_args(parser)
    args = parser.parse_args(argv)
    model, device, dtype = setup(args)
    if args.quick:
        args.num, args.repeat_shots, args.max_tokens = 8, 1, 8
    batch = batch_arguments(args.num, args.repeat_shots)
    engine = engine_options(args, device, dtype)
    rows = [
        {"name": "sglite, radix cache on", **run_sglite(model, batch, args.max_tokens, args.repeat, **engine)},
        {"name": "sglite, radix cache off", **run_sglite(model, batch, args.max_tokens, args.repeat,
                                                         disable_radix_cache=True, **engine)},
    ]
    if not args.skip_transformers:
        rows += run_transformers(model, batch, args.max_tokens, device, dtype, args.repeat)
    baseline = statistics.median(rows[-1]["times"])
    print(header(f"programs: {Path(model).name}, {args.num} few-shot programs, ~{rows[0]['prompt_tokens'] // args.num} "
                 f"prompt tokens each, up to {args.max_tokens} new tokens (stop at newline)", device, dtype, args.repeat))
    print(f"| {'configuration':<44} | {'wall s':>15} | {'programs/s':>10} | {'vs last row':>11} | {'tokens generated':>16} | "
          f"{'cache hit':>9} |")
    print(f"|{'-' * 46}|{'-' * 17}|{'-' * 12}|{'-' * 13}|{'-' * 18}|{'-' * 11}|")
    for row in rows:
        wall = statistics.median(row["times"])
        print(f"| {row['name']:<44} | {min_median(row['times']):>15} | {args.num / wall:>10.1f} | "
              f"{baseline / wall:>10.1f}x | {row['generated']:>16} | {row['cache_hit']:>8.0%} |")
    texts = [row["texts"] for row in rows]
    print(f"generated text identical across rows: {all(t == texts[0] for t in texts)}")
    return rows


if __name__ == "__main__":
    main()
