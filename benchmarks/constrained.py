"""Constrained decoding costs: compile, per-step mask, decode speed, jump-forward, and outlines.

    python benchmarks/constrained.py                    # embedded tiny model (~2k vocab)
    python benchmarks/constrained.py --model PATH --vocab-model PATH --requests 16 --skip extraction
    pip install -e .[bench]                             # adds outlines to table 4

Prints five tables, each measured side by side (both grammar backends) in one run:

1. compile time per regex / schema: cold (a fresh backend, its one-time vocabulary build printed
   separately) vs cached, at the tiny model's vocabulary and the real model's (49k);
2. per-step constrained cost (``mask_logits`` and ``accept_token`` on a full-width row) vs a bool ``masked_fill_``;
3. decode tokens/s through the engine, constrained vs unconstrained, repeated (min / median / max);
4. the longest stall of 8 running streams while one more request compiles (or is refused) a big constraint;
5. a schema-heavy extraction (same chat prompts, schema, checkpoint, greedy) through sglite with
   jump-forward on and off, batched and one at a time, and through ``outlines`` 1.x over
   ``transformers`` one prompt at a time: wall time, tokens/s, forward calls, and how many
   outputs pass ``json.loads`` plus JSON Schema validation. Without outlines installed the
   sglite rows still print, followed by one line saying how to add it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version

import jsonschema
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

import sglite
from sglite.constraints import BACKENDS, ConstraintError, backend_processor, make_backend
from sglite.runtime.loading.tiny_model import build_tiny_model

from _common import default_model_dir

EXTRACTION = {
    "type": "object",
    "properties": {
        "customer_name": {"type": "string", "maxLength": 12},
        "customer_email_verified": {"type": "boolean"},
        "shipping_priority": {"enum": ["standard_delivery", "express_delivery", "same_day_delivery"]},
        "order_quantity": {"type": "integer", "minimum": 1, "maximum": 99},
        "shipping_address": {
            "type": "object",
            "properties": {"street_line": {"type": "string", "maxLength": 16},
                           "postal_code": {"type": "string", "pattern": "[0-9]{5}"}},
            "required": ["street_line", "postal_code"],
        },
    },
    "required": ["customer_name", "customer_email_verified", "shipping_priority", "order_quantity",
                 "shipping_address"],
}

CONSTRAINTS = {
    "regex: date": {"regex": r"\d{4}-\d{2}-\d{2}"},
    "regex: email": {"regex": r"[a-z0-9._]{1,20}@[a-z]{2,10}\.(com|org|net)"},
    "regex: ipv4": {"regex": r"((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"},
    "choices: 5 cities": {"choices": ["Paris", "London", "New York", "Tokyo", "São Paulo"]},
    "schema: flat": {"json_schema": {"type": "object", "properties": {"name": {"type": "string"},
                                                                     "age": {"type": "integer"}},
                                     "required": ["name", "age"]}},
    "schema: extraction": {"json_schema": EXTRACTION},
}


def time_call(fn, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def stats(values: list[float]) -> str:
    """``min / median / max``."""
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def fresh_backend(name: str, tokenizer, eos_ids=None) -> tuple[object, float]:
    """A backend with empty caches, and the seconds its one-time vocabulary build took."""
    start = time.perf_counter()
    backend = make_backend(name, tokenizer, len(tokenizer), eos_ids or {tokenizer.eos_token_id})
    return backend, time.perf_counter() - start


def compile_table(tokenizers: dict[str, object]) -> None:
    print("\n## Compile time (ms): cold = first compile on a fresh backend (its vocabulary build shown "
          "separately), cached = a repeat")
    for tok_name, tokenizer in tokenizers.items():
        print(f"\n### {tok_name}")
        builds = {}
        header = "| constraint | " + " | ".join(f"{b} cold | {b} cached" for b in BACKENDS) + " |"
        print(header)
        print("|" + "---|" * (1 + 2 * len(BACKENDS)))
        for label, constraint in CONSTRAINTS.items():
            cells = []
            for name in BACKENDS:
                backend, build_s = fresh_backend(name, tokenizer)
                builds[name] = build_s
                try:
                    cold = time_call(lambda: backend_processor(backend, **constraint))
                except ConstraintError as exc:
                    cells.append(f"refused: {str(exc)[:40]} | -")
                    continue
                cached = time_call(lambda: backend_processor(backend, **constraint), repeat=20)
                cells.append(f"{cold * 1e3:.1f} | {cached * 1e3:.3f}")
            print(f"| {label} | " + " | ".join(cells) + " |")
        print("one-time vocabulary build: " + ", ".join(f"{n} {s:.2f} s" for n, s in builds.items()))


@contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a small shared machine OpenMP stalls swamp what is being measured."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@one_thread()
def mask_table(tokenizers: dict[str, object], steps: int = 500) -> None:
    print("\n## Per-step constrained cost (median µs per step, 1 thread): mask_logits + accept_token inside a free JSON "
          "string (the widest allowed set), steady state, vs a plain bias add_ and a bool masked_fill_")
    print("| vocabulary | width | backend | mask_logits | accept_token | bias add_ alone | bool masked_fill_ |")
    print("|---|---|---|---|---|---|---|")
    schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    for tok_name, tokenizer in tokenizers.items():
        width = len(tokenizer)
        prefix = tokenizer.encode('{"text": "', add_special_tokens=False)
        letter = tokenizer.encode("a", add_special_tokens=False)[0]
        for name in BACKENDS:
            backend, _ = fresh_backend(name, tokenizer)
            proc = backend_processor(backend, json_schema=schema, jump_forward=False)
            for token in prefix:
                proc.accept_token(token)
            row = torch.randn(width)
            proc.mask_logits(row)  # the state's first mask is built off the clock
            proc.accept_token(letter)
            masked, accepted = [], []
            for _ in range(steps):
                start = time.perf_counter()
                proc.mask_logits(row)
                middle = time.perf_counter()
                proc.accept_token(letter)
                masked.append(middle - start)
                accepted.append(time.perf_counter() - middle)
            bias = torch.where(torch.isinf(row), float("-inf"), 0.0)
            mask = torch.isinf(row)
            added = [time_call(lambda: row.add_(bias)) for _ in range(steps)]
            filled = [time_call(lambda: row.masked_fill_(mask, float("-inf"))) for _ in range(steps)]
            cells = " | ".join(f"{statistics.median(v) * 1e6:.1f}" for v in (masked, accepted, added, filled))
            print(f"| {tok_name} | {width} | {name} | {cells} |")


def decode_table(model: str, requests: int, max_new_tokens: int, repeats: int) -> None:
    print(f"\n## Decode through the engine ({requests} requests, {max_new_tokens} new tokens each, jump-forward off; "
          f"{repeats} timed runs after a warm-up, seconds min / median / max)")
    print("| backend | workload | tokens | seconds | tok/s (best run) | ratio vs free (best runs) |")
    print("|---|---|---|---|---|---|")
    prompts = [f"Record {i}:" for i in range(requests)]
    # min_new_tokens keeps EOS masked so every request decodes as many tokens as the free one
    equal = {"max_new_tokens": max_new_tokens, "min_new_tokens": max_new_tokens}
    workloads = {
        "unconstrained": {"max_new_tokens": max_new_tokens, "ignore_eos": True},
        "regex (date list)": {"regex": r"(\d{4}-\d{2}-\d{2}, ){0,60}\d{4}-\d{2}-\d{2}", **equal},
        "json schema (free text field)": {"json_schema": {"type": "object", "properties": {
            "notes": {"type": "string"}}, "required": ["notes"]}, **equal},
    }
    for name in BACKENDS:
        with sglite.Engine(model, jump_forward=False, grammar_backend=name, max_total_tokens=16384) as engine:
            engine.generate("warm up", {"max_new_tokens": 2})
            base = None
            for label, params in workloads.items():
                if base is not None and name != BACKENDS[0] and label == "unconstrained":
                    continue
                engine.generate(prompts[0], params)  # compile (and warm the mask cache) off the clock
                times, tokens = [], 0
                for _ in range(repeats):
                    start = time.perf_counter()
                    outs = engine.generate(prompts, [{**params, "seed": i} for i in range(requests)])
                    times.append(time.perf_counter() - start)
                    tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
                rate = tokens / min(times)  # the least disturbed run: the machine is shared
                base = base or rate
                print(f"| {name} | {label} | {tokens} | {stats(times)} | {rate:.0f} | {rate / base:.2f} |")


def gil_table(model: str, streams: int = 8) -> None:
    """Max gap between tokens of running streams while another request's constraint compiles (or is refused)."""
    print(f"\n## Stalls: max inter-token gap (ms) of {streams} running streams while one more request brings a "
          "big constraint (compiled or refused in its caller's thread)")
    print("| backend | big constraint | outcome | compile s | max gap before | max gap during |")
    print("|---|---|---|---|---|---|")
    big = {
        "enum of 10k values": {"json_schema": {"enum": [f"value-{i:05d}" for i in range(10_000)]}},
        "94k-char alternation": {"regex": "(?:" + "|".join(f"w{i:06d}x" for i in range(10_500)) + ")"},
        "schema, 300 properties": {"json_schema": {"type": "object", "properties": {
            f"field_{i}": {"type": "string", "maxLength": 30} for i in range(300)}}},
    }
    for name in BACKENDS:
        with sglite.Engine(model, grammar_backend=name, max_total_tokens=16384) as engine:
            engine.generate("warm up", {"max_new_tokens": 2})
            for label, constraint in big.items():
                stamps: list[list[float]] = [[] for _ in range(streams)]
                stop = threading.Event()

                def stream(k: int) -> None:
                    for _ in engine.generate(f"Story {k}:", {"max_new_tokens": 100_000, "ignore_eos": True},
                                             stream=True):
                        stamps[k].append(time.perf_counter())
                        if stop.is_set():
                            break

                threads = [threading.Thread(target=stream, args=(k,)) for k in range(streams)]
                for t in threads:
                    t.start()
                time.sleep(1.5)
                begin = time.perf_counter()
                try:
                    engine.generate("x", {**constraint, "max_new_tokens": 1})
                    outcome = "compiled"
                except ConstraintError as exc:
                    outcome = f"refused: {str(exc)[:40]}"
                end = time.perf_counter()
                time.sleep(0.5)
                stop.set()
                for t in threads:
                    t.join()

                def max_gap(lo: float, hi: float) -> float:
                    """Longest gap between consecutive tokens of one stream that ends inside (lo, hi]."""
                    gaps = [b - a for s in stamps for a, b in zip(s, s[1:]) if lo < b <= hi]
                    return max(gaps, default=float("nan")) * 1e3

                first = min(s[0] for s in stamps if s)
                print(f"| {name} | {label} | {outcome} | {end - begin:.2f} | {max_gap(first + 0.3, begin):.0f} "
                      f"| {max_gap(begin, end + 0.05):.0f} |")


EXTRACTION_FACTS = [("Ana", 3, "express"), ("Bo", 12, "standard"), ("Chen", 1, "same-day"), ("Dee", 40, "express")]


@dataclass(frozen=True)
class ExtractionRun:
    """What one runner did on the side-by-side extraction (the timed pass; warm-up excluded)."""

    label: str
    """Which runner, as printed in the table."""
    texts: list[str]
    """The generated text of every request, in prompt order."""
    completion_tokens: int
    """Output tokens over all requests, EOS and jump-forward tokens included."""
    forced_tokens: int | None
    """Tokens appended by jump-forward without a forward pass; None where the runner has none."""
    forward_calls: int
    """Model forward passes (one batched sglite step counts once)."""
    first_call_s: float
    """Seconds of the untimed first request: constraint compile plus warm-up."""
    seconds: float
    """Wall time of the timed pass over all requests."""


def extraction_prompts(requests: int) -> list[str]:
    """The user messages of the extraction (both runners wrap them in the model's chat template)."""
    messages = []
    for i in range(requests):
        name, quantity, speed = EXTRACTION_FACTS[i % len(EXTRACTION_FACTS)]
        messages.append(f"Extract the order as JSON. {name} (order {i}) wants {quantity} items, {speed} "
                        f"shipping, to {10 + i} Main St, {40100 + i}.")
    return messages


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, message: str) -> list[int]:
    """The ids outlines' transformers integration feeds the model for a ``str`` prompt.

    It applies the chat template when the tokenizer has one, then calls the tokenizer with its
    default special tokens; sglite gets exactly these ids, so both runners see the same prompt.
    """
    text = message
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer(text)["input_ids"]


def run_sglite(model: str, prompts: list[list[int]], max_new_tokens: int, *, jump_forward: bool,
               batched: bool) -> ExtractionRun:
    """Greedy constrained extraction through ``sglite.Engine``: all prompts in one call, or one by one."""
    params = {"json_schema": json.dumps(EXTRACTION), "max_new_tokens": max_new_tokens, "temperature": 0}
    with sglite.Engine(model, jump_forward=jump_forward) as engine:
        first_call_s = time_call(lambda: engine.generate(prompts[0], params))
        before = engine.get_stats()["forward_calls"]
        start = time.perf_counter()
        if batched:
            outs = engine.generate(prompts, [params] * len(prompts))
        else:
            outs = [engine.generate(prompt, params) for prompt in prompts]
        seconds = time.perf_counter() - start
        calls = engine.get_stats()["forward_calls"] - before
    label = f"sglite, {'batched' if batched else 'one at a time'}, jump-forward {'on' if jump_forward else 'off'}"
    return ExtractionRun(label, [o["text"] for o in outs], sum(o["meta_info"]["completion_tokens"] for o in outs),
                         sum(o["meta_info"]["jump_forward_tokens"] for o in outs), calls, first_call_s, seconds)


def run_outlines(model: str, messages: list[str], max_new_tokens: int) -> ExtractionRun:
    """The same extraction with outlines 1.x over ``transformers``, one prompt at a time as outlines runs it.

    Raises ImportError when outlines is not installed.
    """
    import outlines
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its bar would land in the middle of the printed table
    hf_model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)  # sglite's dtype on CPU
    generator = outlines.Generator(
        outlines.from_transformers(hf_model, AutoTokenizer.from_pretrained(model)),
        # Outlines' own default whitespace (an optional space around JSON tokens); sglite writes json.dumps's layout.
        outlines.types.JsonSchema(json.dumps(EXTRACTION)),
    )
    calls = 0

    def count_forward(*_: object) -> None:
        nonlocal calls
        calls += 1

    hook = hf_model.register_forward_hook(count_forward)
    try:
        # The first call also torch.compiles outlines-core's bitmask kernel.
        first_call_s = time_call(lambda: generator(messages[0], max_new_tokens=max_new_tokens, do_sample=False))
        calls = 0
        start = time.perf_counter()
        texts = [generator(message, max_new_tokens=max_new_tokens, do_sample=False) for message in messages]
        seconds = time.perf_counter() - start
    finally:
        hook.remove()
    # transformers' generate at batch size 1 makes exactly one token per forward pass, EOS included.
    return ExtractionRun(f"outlines {version('outlines')} + transformers, one at a time", texts, calls, None,
                         calls, first_call_s, seconds)


def extraction_error(text: str) -> str | None:
    """Why ``text`` is not a valid extraction (``json.loads``, then JSON Schema), or None when it is."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        return "not JSON (cut off at max tokens?)"
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(EXTRACTION).iter_errors(document))
    if error is None:
        return None
    return f"{'/'.join(map(str, error.path)) or '(root)'} fails {error.validator}"


# One thread for every runner: at two, transformers' attention stalls ~10x whenever the machine is shared.
@one_thread()
def extraction_table(model: str, requests: int, max_new_tokens: int) -> None:
    print(f"\n## Schema-heavy extraction side by side ({requests} chat prompts, greedy, up to {max_new_tokens} "
          "new tokens, 1 thread; valid = json.loads + JSON Schema)")
    messages = extraction_prompts(requests)
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = [prompt_token_ids(tokenizer, message) for message in messages]
    runs = [run_sglite(model, prompts, max_new_tokens, jump_forward=on, batched=batched)
            for batched in (True, False) for on in (True, False)]
    # Without outlines, compare with sglite decoding the way outlines does: one request, one token per step.
    baseline, baseline_name, missing = runs[-1], "sglite one at a time, jump-forward off", None
    try:
        runs.append(run_outlines(model, messages, max_new_tokens))
        baseline, baseline_name = runs[-1], "outlines"
    except ImportError:
        missing = "outlines: not installed; `pip install -e .[bench]` adds it to this table"
    print(f"| runner | tokens | forced | forward calls | first call s | seconds | tok/s | valid "
          f"| speedup vs {baseline_name} |")
    print("|---|---|---|---|---|---|---|---|---|")
    errors = {run.label: Counter(e for e in map(extraction_error, run.texts) if e) for run in runs}
    for run in runs:
        valid = len(run.texts) - sum(errors[run.label].values())
        forced = "-" if run.forced_tokens is None else run.forced_tokens
        print(f"| {run.label} | {run.completion_tokens} | {forced} | {run.forward_calls} | {run.first_call_s:.2f} "
              f"| {run.seconds:.2f} | {run.completion_tokens / run.seconds:.0f} | {valid}/{len(run.texts)} "
              f"| {baseline.seconds / run.seconds:.1f}x |")
    for label, counts in errors.items():
        if counts:
            print(f"invalid ({label}): " + "; ".join(f"{n}x {e}" for e, n in counts.most_common()))
    if missing:
        print(missing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the embedded tiny llama)")
    parser.add_argument("--vocab-model", default=None,
                        help="a second tokenizer for the compile and mask tables (default: the default model's, 49k)")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each decode workload")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="decode table's output length")
    parser.add_argument("--extraction-max-new-tokens", type=int, default=256,
                        help="extraction table's cap (the schema needs ~100-200 tokens on the tiny model)")
    parser.add_argument("--skip", default="", help="comma-separated tables to skip: compile,mask,decode,gil,extraction")
    args = parser.parse_args()
    model = args.model or str(build_tiny_model("llama"))
    skip = set(filter(None, args.skip.split(",")))
    print(f"# {' '.join(sys.argv)}\n# device cpu, dtype float32, torch threads {torch.get_num_threads()} "
          f"(mask table: 1), torch {torch.__version__}, model {model}")

    tokenizers: dict[str, object] = {f"tiny ({len(AutoTokenizer.from_pretrained(model))})":
                                     AutoTokenizer.from_pretrained(model)}
    args.vocab_model = args.vocab_model or default_model_dir()
    if os.path.isdir(args.vocab_model):
        tokenizer = AutoTokenizer.from_pretrained(args.vocab_model)
        tokenizers[f"{os.path.basename(args.vocab_model)} ({len(tokenizer)})"] = tokenizer
    if "compile" not in skip:
        compile_table(tokenizers)
    if "mask" not in skip:
        mask_table(tokenizers)
    if "decode" not in skip:
        decode_table(model, args.requests, args.max_new_tokens, args.repeats)
    if "gil" not in skip:
        gil_table(model)
    if "extraction" not in skip:
        extraction_table(model, args.requests, args.extraction_max_new_tokens)


if __name__ == "__main__":
    main()
