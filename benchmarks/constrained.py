"""Constrained decoding costs: compile, per-step mask, decode speed, and jump-forward savings.

    python benchmarks/constrained.py                    # embedded tiny model (~2k vocab)
    python benchmarks/constrained.py --model PATH --big-vocab 150000 --requests 16

Prints four tables, each measured side by side in one run:

1. compile time per regex / schema: cold (empty caches) vs cached, at the tokenizer's vocabulary
   and at a synthetic ``--big-vocab`` one (a fake tokenizer of random pieces; 0 skips it);
2. per-step mask cost (``mask_logits`` on a row at full vocabulary width) vs a bool ``masked_fill_``;
3. decode tokens/s through the engine, constrained vs unconstrained;
4. model forward calls on a schema-heavy extraction with jump-forward on vs off.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import time

import torch

import sglite
from sglite.constraints import build_logits_processor, clear_compile_cache
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
            cold = time_call(lambda: build_logits_processor(tokenizer, len(tokenizer), **constraint))
            cached = time_call(lambda: build_logits_processor(tokenizer, len(tokenizer), **constraint), repeat=20)
            cells.append(f"{cold * 1e3:.1f} | {cached * 1e3:.3f} | {cold / cached:.0f}x")
        print(f"| {label} | " + " | ".join(cells) + " |")


def mask_table(tokenizers: dict[str, object], steps: int = 300) -> None:
    # One intra-op thread: on a small shared machine OpenMP stalls swamp what is being measured.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
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
    torch.set_num_threads(threads)


def decode_table(model: str, requests: int, max_new_tokens: int) -> None:
    print(f"\n## Decode through the engine ({requests} requests, up to {max_new_tokens} new tokens each)")
    print("| workload | tokens | seconds | tok/s | ratio vs free |")
    print("|---|---|---|---|---|")
    prompts = [f"Record {i}:" for i in range(requests)]
    workloads = {
        "unconstrained": {"max_new_tokens": max_new_tokens, "ignore_eos": True},
        "regex (date list)": {"regex": r"(\d{4}-\d{2}-\d{2}, ){0,30}\d{4}-\d{2}-\d{2}",
                              "max_new_tokens": max_new_tokens},
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


def jump_forward_table(model: str, requests: int) -> None:
    print(f"\n## Jump-forward on a schema-heavy extraction ({requests} requests)")
    print("| jump_forward | completion tokens | forced tokens | forward calls | seconds | calls ratio |")
    print("|---|---|---|---|---|---|")
    prompts = [f"Extract order {i}:" for i in range(requests)]
    params = [{"json_schema": json.dumps(EXTRACTION), "max_new_tokens": 256, "seed": i} for i in range(requests)]
    first = None
    for enabled in (False, True):
        with sglite.Engine(model, jump_forward=enabled) as engine:
            engine.generate(prompts[0], params[0])  # compile and warm up off the clock
            before = engine.get_stats()["forward_calls"]
            start = time.perf_counter()
            outs = engine.generate(prompts, params)
            elapsed = time.perf_counter() - start
            calls = engine.get_stats()["forward_calls"] - before
        tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
        forced = sum(o["meta_info"]["jump_forward_tokens"] for o in outs)
        first = first or calls
        print(f"| {'on' if enabled else 'off'} | {tokens} | {forced} | {calls} | {elapsed:.2f} | {calls / first:.2f} |")


def outlines_line() -> None:
    try:
        import outlines  # noqa: F401
    except ImportError:
        print("\noutlines: not installed")
        return
    print(f"\noutlines {outlines.__version__}: installed (no side-by-side run implemented)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the embedded tiny llama)")
    parser.add_argument("--big-vocab", type=int, default=150_000, help="synthetic vocabulary size; 0 to skip")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    model = args.model or str(build_tiny_model("llama"))

    from transformers import AutoTokenizer

    tokenizers: dict[str, object] = {f"tokenizer ({len(AutoTokenizer.from_pretrained(model))})":
                                     AutoTokenizer.from_pretrained(model)}
    if args.big_vocab:
        tokenizers[f"fake {args.big_vocab // 1000}k"] = FakeTokenizer(args.big_vocab)
    compile_table(tokenizers)
    mask_table(tokenizers)
    decode_table(model, args.requests, args.max_new_tokens)
    jump_forward_table(model, args.requests)
    outlines_line()


if __name__ == "__main__":
    main()
