"""JSON Schema coverage on real schemas (JSONSchemaBench sample): what runs by default, what is enforced, what it costs.

Four tables, each on the llguidance backend (the default) and the real default model's tokenizer:

1. Per subset: schemas that run by default (compiled; relaxed keywords checked on the output),
   of those fully enforced in the grammar (``strict=True`` compiles too), refused (with the
   reason), timed out.
2. Per keyword: schemas using it, enforced in the grammar vs relaxed and checked after.
3. Compile time p50/p95/max (cold: each schema once on a fresh backend) and the per-token mask
   cost (a random walk through each grammar on the real vocabulary: bitmask + logit bias).
4. Through the engine on the real model (``--sample`` schemas, temperature 1): outputs reported
   valid / invalid / truncated, and outputs reported valid that an independent ``jsonschema``
   validation rejects (must be 0); then constrained vs unconstrained decode throughput at batch
   1 and 8 (same engine, jump-forward off so every token is sampled).

    python benchmarks/schema_coverage.py [--model PATH] [--schemas FILE] [--sample 40] [--timeout 10]

Compiles run in a child process (forked before any engine thread exists) killed at ``--timeout``
and memory-capped at ``--memory-gb``.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

KEYWORDS = ("format", "pattern", "patternProperties", "oneOf", "anyOf", "allOf", "not", "dependencies",
            "dependentRequired", "dependentSchemas", "if", "uniqueItems", "propertyNames", "contains",
            "minProperties", "maxProperties", "multipleOf", "$ref", "minimum", "maximum")


def default_schemas() -> Path:
    """JSONSchemaBench's dev sample in ``shared/`` beside the checkout (pass ``--schemas`` for another)."""
    return Path(__file__).resolve().parents[2] / "shared/jsonschemabench/dev_sample.jsonl"


def cpu_line() -> str:
    model, flags = platform.processor() or "unknown CPU", []
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    except OSError:
        pass
    isa = [f for f in flags if f.startswith(("avx", "amx", "sse4", "fma", "f16c"))]
    return f"{model}; ISA {' '.join(isa) or 'unknown'}; {os.cpu_count()} CPUs"


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    if model.endswith(".gguf"):
        from sglite.runtime.loading.gguf_tokenizer import save_gguf_tokenizer

        out = tempfile.mkdtemp(prefix="schema-coverage-tok-")
        save_gguf_tokenizer(model, out)
        return AutoTokenizer.from_pretrained(out)
    return AutoTokenizer.from_pretrained(model)


def keywords_used(schema) -> set[str]:
    text = json.dumps(schema)
    return {k for k in KEYWORDS if f'"{k}":' in text}


def _worker(backend, conn, memory_gb: float) -> None:
    from sglite.constraints import ConstraintError, ConstraintSpec

    limit = int(memory_gb * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    warnings.simplefilter("ignore")
    # Warm-up: the first compile imports the validators and builds the format checker, once per process.
    backend.compile(ConstraintSpec.from_params(json_schema={"properties": {"t": {"format": "date-time"}}}))
    while True:
        schema = conn.recv()
        if schema is None:
            return
        start = time.perf_counter()
        try:
            compiled = backend.compile(ConstraintSpec.from_params(json_schema=schema))
            ms = (time.perf_counter() - start) * 1e3
            relaxed = sorted({k for entry in compiled.relaxed for k in re.findall(r"'([$\w]+)' at", entry)})
            try:
                backend.compile(ConstraintSpec.from_params(json_schema=schema, strict=True))
                status = "enforced"
            except ConstraintError:
                status = "checked"
            conn.send((status, relaxed, dict(compiled.enforced), ms, ""))
        except ConstraintError as exc:
            conn.send(("refused", [], {}, (time.perf_counter() - start) * 1e3, str(exc)[:200]))
        except MemoryError:
            conn.send(("refused", [], {}, (time.perf_counter() - start) * 1e3, "out of memory (--memory-gb)"))


class Compiler:
    """The backend in a child process; restarted (from the same parent state) after a timeout."""

    def __init__(self, backend, timeout: float, memory_gb: float) -> None:
        self.backend, self.timeout, self.memory_gb = backend, timeout, memory_gb
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(self.backend, child, self.memory_gb), daemon=True)
        self.proc.start()

    def compile(self, schema):
        self.conn.send(schema)
        if self.conn.poll(self.timeout):
            try:
                return self.conn.recv()
            except EOFError:
                pass
        self.proc.kill()
        self.proc.join()
        self._start()
        return ("timeout", [], {}, self.timeout * 1e3, f"over {self.timeout:.0f} s or killed")

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(5)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def mask_cost(backend, outputs: list[tuple[dict, list[int]]], vocab: int) -> tuple[list[float], list[float]]:
    """Microseconds per masked token, replaying the engine's outputs through fresh processors:
    (first replay of each output, second replay), the second being what a grammar's later requests pay."""
    import torch

    from sglite.constraints import ConstraintSpec

    rounds: tuple[list[float], list[float]] = ([], [])
    logits = torch.zeros(vocab)
    for per_token in rounds:
        for schema, token_ids in outputs:
            proc = backend.processor(ConstraintSpec.from_params(json_schema=schema), jump_forward=False)
            for token in token_ids:
                if proc.is_finished():
                    break
                start = time.perf_counter()
                proc.mask_logits(logits)
                per_token.append((time.perf_counter() - start) * 1e6)
                logits.zero_()
                proc.accept_token(token)
    return rounds


def independent_valid(schema, text: str) -> bool:
    import jsonschema

    try:
        document = json.loads(text)
    except ValueError:
        return False
    cls = jsonschema.validators.validator_for(schema, jsonschema.Draft202012Validator)
    return cls(schema, format_checker=jsonschema.FormatChecker()).is_valid(document)


def sample_outputs(engine, schemas: list, max_new_tokens: int) -> tuple[collections.Counter, list]:
    counts: collections.Counter = collections.Counter()
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Reply with one JSON document."}],
                                                  tokenize=False, add_generation_prompt=True)
    params = [{"json_schema": s, "temperature": 1.0, "seed": i, "max_new_tokens": max_new_tokens}
              for i, s in enumerate(schemas)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs = engine.generate([prompt] * len(params), params)
    for out, param in zip(outs, params):
        meta = out["meta_info"]
        truth = independent_valid(param["json_schema"], out["text"])
        if meta["finish_reason"]["type"] == "length":
            counts["truncated"] += 1
        counts["reported valid" if meta["schema_valid"] else "reported invalid"] += 1
        if meta["schema_valid"] and not truth:
            counts["reported valid, not valid"] += 1
        if not meta["schema_valid"] and truth:
            counts["reported invalid, valid"] += 1
    return counts, [(param["json_schema"], out["output_ids"]) for out, param in zip(outs, params)]


THROUGHPUT_SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 200}
"""Long enough that every constrained request runs to max_new_tokens, like the unconstrained ones."""


def throughput(engine, batch: int, tokens: int, repeats: int) -> tuple[list[float], list[float]]:
    """(unconstrained, constrained) tokens/s, alternating run by run so both see the same machine load."""
    prompt = "Write a list of city names as JSON:"
    runs = {False: [], True: []}
    for repeat in range(repeats + 1):  # the first round is the warm-up
        for constrained in (False, True):
            extra = {"json_schema": THROUGHPUT_SCHEMA} if constrained else {"ignore_eos": True}
            params = [{"max_new_tokens": tokens, "temperature": 0.0, **extra} for _ in range(batch)]
            start = time.perf_counter()
            outs = engine.generate([f"{prompt} #{i}" for i in range(batch)], params)
            elapsed = time.perf_counter() - start
            if repeat:
                runs[constrained].append(sum(o["meta_info"]["completion_tokens"] for o in outs) / elapsed)
    return runs[False], runs[True]


def main() -> None:
    from sglite.runtime.loading.default_model import default_model_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="default: the packaged SmolLM2-135M-Instruct GGUF")
    parser.add_argument("--schemas", default=str(default_schemas()))
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--memory-gb", type=float, default=4.0)
    parser.add_argument("--sample", type=int, default=40, help="schemas sampled through the engine (0: none)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--throughput-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--throughput-only", action="store_true", help="only the throughput table")
    args = parser.parse_args()
    model = args.model or default_model_path()
    if args.throughput_only:
        return throughput_table(model, args)

    import torch

    from sglite.constraints import make_backend

    rows = [json.loads(line) for line in open(args.schemas)]
    tokenizer = load_tokenizer(model)
    print(f"# {' '.join(sys.argv)}\n# CPU: {cpu_line()}\n# torch threads {torch.get_num_threads()}, float32; "
          f"{len(rows)} schemas from {args.schemas}; model {os.path.basename(model)} ({len(tokenizer)} tokens)")
    start = time.perf_counter()
    backend = make_backend("llguidance", tokenizer, len(tokenizer), {tokenizer.eos_token_id})
    print(f"# llguidance: one-time vocabulary build {time.perf_counter() - start:.2f} s (not in compile times)")
    compiler = Compiler(backend, args.timeout, args.memory_gb)
    results = [compiler.compile(row["schema"]) for row in rows]
    compiler.close()

    print("\n## Runs by default, per subset (llguidance)")
    print("| subset | n | runs by default | fully enforced | relaxed + checked | refused | timeout |")
    print("|---|---|---|---|---|---|---|")
    subsets = sorted({row["subset"] for row in rows})
    for subset in subsets + ["all"]:
        idx = [i for i, row in enumerate(rows) if subset == "all" or row["subset"] == subset]
        c = collections.Counter(results[i][0] for i in idx)
        runs = c["enforced"] + c["checked"]
        print(f"| {subset} | {len(idx)} | {runs} ({100 * runs / len(idx):.1f}%) | {c['enforced']} | {c['checked']} | "
              f"{c['refused']} | {c['timeout']} |")

    print("\n## Per keyword: schemas using it, enforced in the grammar vs relaxed and checked on the output")
    print("| keyword | schemas | enforced | checked after | rewritten (places) |")
    print("|---|---|---|---|---|")
    for keyword in KEYWORDS:
        using = [i for i, row in enumerate(rows) if keyword in keywords_used(row["schema"])
                 and results[i][0] in ("enforced", "checked")]
        if not using:
            continue
        checked = sum(1 for i in using if keyword in results[i][1])
        rewritten = sum(results[i][2].get(keyword, 0) for i in using)
        print(f"| {keyword} | {len(using)} | {len(using) - checked} | {checked} | {rewritten} |")

    refusals = [(rows[i]["file"], r[4]) for i, r in enumerate(results) if r[0] in ("refused", "timeout")]
    if refusals:
        print("\n## Refused")
        for name, reason in refusals:
            print(f"- {name}: {reason}")

    ms = [r[3] for r in results if r[0] in ("enforced", "checked")]
    print("\n## Compile time (ms; each schema once, cold, after one warm-up compile of a tiny schema)")
    print("| compiled | p50 | p95 | max |")
    print("|---|---|---|---|")
    print(f"| {len(ms)}/{len(rows)} | {statistics.median(ms):.1f} | {pct(ms, 0.95):.1f} | {max(ms):.1f} |")
    if not args.sample:
        return

    import sglite

    with sglite.Engine(model, max_total_tokens=32768, max_running_requests=16, jump_forward=False) as engine:
        chosen = [rows[i]["schema"] for i, r in enumerate(results) if r[0] in ("enforced", "checked")]
        step = max(1, len(chosen) // args.sample)
        counts, outputs = sample_outputs(engine, chosen[::step][: args.sample], args.max_new_tokens)
        print(f"\n## Outputs through the engine ({os.path.basename(model)}, temperature 1, max_new_tokens "
              f"{args.max_new_tokens}; truth = jsonschema with its FormatChecker)")
        print("| schemas | reported valid | reported invalid | of which truncated | reported valid, not valid | "
              "reported invalid, valid |")
        print("|---|---|---|---|---|---|")
        print(f"| {sum(counts[k] for k in ('reported valid', 'reported invalid'))} | {counts['reported valid']} | "
              f"{counts['reported invalid']} | {counts['truncated']} | {counts['reported valid, not valid']} | "
              f"{counts['reported invalid, valid']} |")
        first, again = mask_cost(backend, outputs, len(tokenizer))
        print("\n## Per-token mask cost (µs: bitmask + cached 0/-inf bias add), replaying those outputs")
        print("| replay | p50 | p95 | tokens |")
        print("|---|---|---|---|")
        for label, costs in (("first (lexer states built)", first), ("again (steady state)", again)):
            print(f"| {label} | {statistics.median(costs):.0f} | {pct(costs, 0.95):.0f} | {len(costs)} |")
        throughput_rows(engine, args)


def throughput_rows(engine, args) -> None:
    print(f"\n## Decode throughput, constrained vs unconstrained (tokens/s, {args.throughput_tokens} new tokens, "
          f"greedy, jump-forward off, {args.repeats} alternating repetitions after a warm-up)")
    print("| batch | unconstrained min / median | constrained min / median | ratio (median) |")
    print("|---|---|---|---|")
    for batch in (1, 8):
        free, masked = throughput(engine, batch, args.throughput_tokens, args.repeats)
        print(f"| {batch} | {min(free):.1f} / {statistics.median(free):.1f} | {min(masked):.1f} / "
              f"{statistics.median(masked):.1f} | {statistics.median(masked) / statistics.median(free):.2f}x |")


def throughput_table(model: str, args) -> None:
    import torch

    import sglite

    print(f"# {' '.join(sys.argv)}\n# CPU: {cpu_line()}\n# torch threads {torch.get_num_threads()}, float32")
    with sglite.Engine(model, max_total_tokens=32768, max_running_requests=16, jump_forward=False) as engine:
        throughput_rows(engine, args)


if __name__ == "__main__":
    main()
