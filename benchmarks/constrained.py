"""Constrained decoding costs: compile, per-step mask, decode speed, jump-forward, and outlines.

    python benchmarks/constrained.py                    # embedded tiny model (~2k vocab)
    python benchmarks/constrained.py --model PATH --big-vocab 150000 --requests 16
    pip install -e .[bench]                             # adds outlines to table 4

Prints four tables, each measured side by side in one run:

1. compile time per regex / schema: cold (empty caches) vs cached, at the tokenizer's vocabulary
   and at a synthetic ``--big-vocab`` one (a fake tokenizer of random pieces; 0 skips it);
2. per-step mask cost (``mask_logits`` on a row at full vocabulary width) vs a bool ``masked_fill_``;
3. decode tokens/s through the engine, constrained vs unconstrained;
4. a schema-heavy extraction (same chat prompts, schema, checkpoint, greedy) through sglite with
   jump-forward on and off, batched and one at a time, and through ``outlines`` 1.x over
   ``transformers`` one prompt at a time: wall time, tokens/s, forward calls, and how many
   outputs pass ``json.loads`` plus JSON Schema validation. Without outlines installed the
   sglite rows still print, followed by one line saying how to add it.
"""

from __future__ import annotations

import argparse
import json
import random
import string
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
from sglite.constraints import ConstraintError, build_logits_processor, clear_compile_cache
from sglite.runtime.tiny_model import build_tiny_model

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


class FakeTokenizer:
    """Just enough of a Hugging Face tokenizer to build a big vocabulary (no encode fidelity)."""

    def __init__(self, size: int, seed: int = 0) -> None:
        rng = random.Random(seed)
        pieces = {chr(c) for c in range(32, 127)} | {chr(c) for c in range(160, 1200)}
        alphabet = string.ascii_lowercase + string.digits + "_-.,:\"{}[]"
        while len(pieces) < size - 1:
            word = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 9)))
            pieces.add((" " if rng.random() < 0.5 else "") + word)
        self._vocab = {"</s>": 0, **{p: i + 1 for i, p in enumerate(sorted(pieces))}}
        self.eos_token_id = 0
        self.all_special_ids = [0]
        self.added_tokens_decoder: dict = {}
        self.name_or_path = f"fake-{size}"

    def get_vocab(self) -> dict[str, int]:
        return self._vocab

    def __len__(self) -> int:
        return len(self._vocab)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self._vocab[c] for c in text if c in self._vocab]


def time_call(fn, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def compile_table(tokenizers: dict[str, object]) -> None:
    print("\n## Compile time (ms): cold = empty caches, cached = LRU hit")
    header = "| constraint | " + " | ".join(f"{name} cold | {name} cached | ratio" for name in tokenizers) + " |"
    print(header)
    print("|" + "---|" * (1 + 3 * len(tokenizers)))
    for label, constraint in CONSTRAINTS.items():
        cells = []
        for tokenizer in tokenizers.values():
            clear_compile_cache()
            try:
                cold = time_call(lambda: build_logits_processor(tokenizer, len(tokenizer), **constraint))
            except ConstraintError:  # e.g. a --model tokenizer with no token for "ã"
                cells.append("cannot spell | - | -")
                continue
            cached = time_call(lambda: build_logits_processor(tokenizer, len(tokenizer), **constraint), repeat=20)
            cells.append(f"{cold * 1e3:.1f} | {cached * 1e3:.3f} | {cold / cached:.0f}x")
        print(f"| {label} | " + " | ".join(cells) + " |")


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
def mask_table(tokenizers: dict[str, object], steps: int = 300) -> None:
    print("\n## Per-step mask cost (µs per row, 1 thread; state bias cached; free-string state)")
    print("| vocabulary | width | mask_logits (bias add_) | bool masked_fill_ (alternative) | ratio |")
    print("|---|---|---|---|---|")
    schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    for name, tokenizer in tokenizers.items():
        width = len(tokenizer)
        proc = build_logits_processor(tokenizer, width, json_schema=schema, jump_forward=False)
        for char in '{"text":"':  # walk into the free string: the widest allowed set
            ids = tokenizer.encode(char, add_special_tokens=False)
            if ids:
                proc.accept_token(ids[0])
        row = torch.randn(width)
        proc.mask_logits(row)  # build the state's bias off the clock; re-adding 0/-inf is idempotent
        mask = proc.fsm.disallowed_mask(proc.state, width, row.device)
        added = time_call(lambda: proc.mask_logits(row), steps)
        filled = time_call(lambda: row.masked_fill_(mask, float("-inf")), steps)
        print(f"| {name} | {width} | {added * 1e6:.1f} | {filled * 1e6:.1f} | {filled / added:.1f}x |")


def decode_table(model: str, requests: int, max_new_tokens: int) -> None:
    print(f"\n## Decode through the engine ({requests} requests, up to {max_new_tokens} new tokens each)")
    print("| workload | tokens | seconds | tok/s | ratio vs free |")
    print("|---|---|---|---|---|")
    prompts = [f"Record {i}:" for i in range(requests)]
    workloads = {
        "unconstrained": {"max_new_tokens": max_new_tokens, "ignore_eos": True},
        # min_new_tokens keeps EOS masked so every request decodes as many tokens as the free one
        "regex (date list)": {"regex": r"(\d{4}-\d{2}-\d{2}, ){0,30}\d{4}-\d{2}-\d{2}",
                              "max_new_tokens": max_new_tokens, "min_new_tokens": max_new_tokens},
        "json schema (extraction)": {"json_schema": json.dumps(EXTRACTION), "max_new_tokens": max_new_tokens},
    }
    with sglite.Engine(model, jump_forward=False) as engine:
        engine.generate("warm up", {"max_new_tokens": 2})
        base = None
        for label, params in workloads.items():
            engine.generate(prompts[0], params)  # compile off the clock
            start = time.perf_counter()
            outs = engine.generate(prompts, [{**params, "seed": i} for i in range(requests)])
            elapsed = time.perf_counter() - start
            tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
            rate = tokens / elapsed
            base = base or rate
            print(f"| {label} | {tokens} | {elapsed:.2f} | {rate:.0f} | {rate / base:.2f} |")


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
        # Compact whitespace, as sglite compiles schemas by default, so both constrain the same JSON layout.
        outlines.types.JsonSchema(json.dumps(EXTRACTION), whitespace_pattern=""),
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
    parser.add_argument("--big-vocab", type=int, default=150_000, help="synthetic vocabulary size; 0 to skip")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="decode table's output length")
    parser.add_argument("--extraction-max-new-tokens", type=int, default=256,
                        help="extraction table's cap (the schema needs ~100-200 tokens on the tiny model)")
    args = parser.parse_args()
    model = args.model or str(build_tiny_model("llama"))

    tokenizers: dict[str, object] = {f"tokenizer ({len(AutoTokenizer.from_pretrained(model))})":
                                     AutoTokenizer.from_pretrained(model)}
    if args.big_vocab:
        tokenizers[f"fake {args.big_vocab // 1000}k"] = FakeTokenizer(args.big_vocab)
    compile_table(tokenizers)
    mask_table(tokenizers)
    decode_table(model, args.requests, args.max_new_tokens)
    extraction_table(model, args.requests, args.extraction_max_new_tokens)


if __name__ == "__main__":
    main()
