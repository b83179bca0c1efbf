"""Few-shot programs through ``run_batch``: radix cache on vs off, vs plain transformers ``generate``.

Every program shares a long few-shot prefix and asks its own question, the workload the radix
cache is for. Three ways to run the same 64 programs:

* sglite, radix cache on: the prefix is computed once, then served from the cache;
* sglite, radix cache off (``disable_radix_cache=True``): continuous batching only;
* transformers: one ``model.generate`` call per program, as a plain script would do.

    python benchmarks/programs.py                        # embedded tiny model
    python benchmarks/programs.py --model PATH --num 64 --max-tokens 32
"""

from __future__ import annotations

import argparse
import time

import sglite as sgl

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


def run_sglite(model: str | None, batch: list[dict], max_tokens: int, **engine_options) -> dict:
    with sgl.Runtime(model, **engine_options) as runtime:
        classify.run(**batch[0], backend=runtime, max_new_tokens=max_tokens, temperature=0, ignore_eos=True)  # warm-up
        start = time.perf_counter()
        states = classify.run_batch(batch, backend=runtime, max_new_tokens=max_tokens, temperature=0, ignore_eos=True)
        wall = time.perf_counter() - start
        metas = [st.get_meta_info("topic") for st in states]
        prompt = sum(m["prompt_tokens"] for m in metas)
        return {"wall": wall, "cache_hit": sum(m["cached_tokens"] for m in metas) / prompt, "prompt_tokens": prompt}


def run_transformers(model_path: str, batch: list[dict], max_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    prompts = [_prompt_text(args) for args in batch]

    def one(text: str) -> None:
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)

    one(prompts[0])  # warm-up
    start = time.perf_counter()
    for text in prompts:
        one(text)
    return {"wall": time.perf_counter() - start, "cache_hit": 0.0, "prompt_tokens": None}


def _prompt_text(args: dict) -> str:
    """The exact text ``classify`` sends before its ``gen``."""
    text = "Classify each sentence into a topic.\n\n"
    for sentence, topic in args["shots"]:
        text += f"Sentence: {sentence}\nTopic: {topic}\n\n"
    return text + f"Sentence: {args['sentence']}\nTopic:"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model path (default: $SGLITE_MODEL, else the tiny model)")
    parser.add_argument("--num", type=int, default=64, help="programs in the batch")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated per program")
    parser.add_argument("--repeat-shots", type=int, default=3, help="few-shot examples repeated to lengthen the prefix")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args(argv)

    from sglite.lang.backends.runtime import default_model_path

    model = args.model or default_model_path()
    batch = batch_arguments(args.num, args.repeat_shots)
    rows = [
        {"name": "sglite, radix cache on", **run_sglite(model, batch, args.max_tokens)},
        {"name": "sglite, radix cache off", **run_sglite(model, batch, args.max_tokens, disable_radix_cache=True)},
    ]
    if not args.skip_transformers:
        rows.append({"name": "transformers generate, one call per program", **run_transformers(model, batch, args.max_tokens)})
    baseline = rows[-1]["wall"]
    print(f"\n{args.num} few-shot programs, ~{rows[0]['prompt_tokens'] // args.num} prompt tokens each, "
          f"{args.max_tokens} new tokens each\n")
    print(f"| {'configuration':<44} | {'wall (s)':>8} | {'programs/s':>10} | {'speedup':>7} | {'cache hit':>9} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 12}|{'-' * 9}|{'-' * 11}|")
    for row in rows:
        print(f"| {row['name']:<44} | {row['wall']:>8.2f} | {args.num / row['wall']:>10.1f} | "
              f"{baseline / row['wall']:>6.1f}x | {row['cache_hit']:>8.0%} |")
    return rows


if __name__ == "__main__":
    main()
