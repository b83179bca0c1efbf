"""Extraction quality: the demo's labelled bios asked three ways, side by side.

* sglite, JSON-schema constrained (``gen(json_schema=Person)``, the demo's program);
* sglite, unconstrained (the same prompt, free text; the first JSON object in the answer is scored);
* transformers ``generate``, unconstrained: the same chat prompt, greedy, one call per bio.

Each row reports the valid-JSON rate, the fields (name, age, city) that match the labels
(``examples/labelled_bios.jsonl``) and the wall time of the batch after a warm-up request (which
compiles the schema's automaton and warms the caches). Same device (CPU), dtype (float32), threads,
greedy decoding and token budget for all three.

    python benchmarks/extraction_quality.py                 # the embedded SmolLM2-135M-Instruct
    python benchmarks/extraction_quality.py --model PATH    # a directory, .gguf file or cached hub id
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import sglite as sgl
from sglite.demo import EXTRACTION_SYSTEM, FIELDS, extract_person, fields_correct, load_labelled, parse_answer

MAX_TOKENS = 96


def score(texts: list[str], bios: list[dict]) -> tuple[int, int]:
    answers = [parse_answer(text) for text in texts]
    return sum(a is not None for a in answers), sum(fields_correct(a, b) for a, b in zip(answers, bios))


def run_sglite(runtime: sgl.Runtime, bios: list[dict], constrained: bool, repeats: int) -> dict:
    rows = [{"text": b["text"], "constrained": constrained} for b in bios]
    extract_person.run(**rows[0], backend=runtime)  # warm-up
    walls, texts = [], []
    for _ in range(repeats):
        runtime.flush_cache()  # every repetition starts cold, like the first (the warm-up's prefix included)
        start = time.perf_counter()
        states = extract_person.run_batch(rows, backend=runtime)
        walls.append(time.perf_counter() - start)
        texts = [state["person"] for state in states]
    return {"texts": texts, "walls": walls}


def run_transformers(engine_path: str, bios: list[dict], repeats: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(engine_path)
    from sglite.runtime.loading.gguf_loader import transformers_source

    path, kwargs = transformers_source(engine_path)  # a GGUF's folder has no weights: transformers reads the file
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": EXTRACTION_SYSTEM}, {"role": "user", "content": b["text"]}],
            add_generation_prompt=True, tokenize=True, return_dict=False,
        )
        for b in bios
    ]
    eos = tokenizer.eos_token_id

    def generate(ids: list[int]) -> str:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                 eos_token_id=eos, pad_token_id=eos)
        return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)

    generate(prompts[0])  # warm-up
    walls, texts = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        texts = [generate(ids) for ids in prompts]
        walls.append(time.perf_counter() - start)
    return {"texts": texts, "walls": walls}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: $SGLITE_MODEL, else the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--repeats", type=int, default=1, help="timed repetitions per setup (min and median shown)")
    parser.add_argument("--num", type=int, default=None, help="only the first NUM bios (default: all)")
    args = parser.parse_args(argv)

    bios = load_labelled("labelled_bios")[: args.num]
    total = len(FIELDS) * len(bios)
    with sgl.Runtime(args.model) as runtime:
        engine_path = runtime.engine.model_path  # a .gguf's folder: transformers reads the file it names
        results = {
            "sglite, json_schema constrained": run_sglite(runtime, bios, True, args.repeats),
            "sglite, unconstrained": run_sglite(runtime, bios, False, args.repeats),
        }
    results["transformers generate, unconstrained"] = run_transformers(engine_path, bios, args.repeats)

    print(f"extraction_quality: {len(bios)} labelled bios, {total} fields (name, age, city); "
          f"greedy, <= {MAX_TOKENS} new tokens; torch threads {torch.get_num_threads()}")
    print("| setup                                | valid JSON | fields correct | wall s (min) | wall s (median) |")
    print("|--------------------------------------|------------|----------------|--------------|-----------------|")
    for name, result in results.items():
        valid, correct = score(result["texts"], bios)
        print(f"| {name:<36} | {valid:>4}/{len(bios):<5} | {correct:>4}/{total:<3} {correct / total:>4.0%} "
              f"| {min(result['walls']):>12.2f} | {statistics.median(result['walls']):>15.2f} |")
    same = results["sglite, unconstrained"]["texts"] == results["transformers generate, unconstrained"]["texts"]
    print(f"unconstrained sglite text identical to transformers: {same}")


if __name__ == "__main__":
    main()
