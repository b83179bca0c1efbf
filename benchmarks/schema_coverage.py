"""JSON Schema coverage of each grammar backend on real schemas (JSONSchemaBench sample), side by side.

For every schema and backend: compiled strictly, compiled only in lenient mode (each relaxation
reported), refused (with the reason), or timed out; compile time median / p95 (cold: each
schema once, a fresh backend whose one-time vocabulary build is reported separately). Then for
up to ``--sample`` compiled schemas, 3 samples each at temperature 1 through the engine on the
real default model, validated with ``jsonschema``: valid / truncated (hit max_new_tokens) / invalid.

    python benchmarks/schema_coverage.py [--model PATH] [--schemas FILE] [--sample 60] [--timeout 10]

Each backend compiles in a child process (forked after the vocabulary is built) so a compile
that runs away is killed at ``--timeout`` and memory-capped at ``--memory-gb``.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

from _common import default_model_dir

BACKENDS = ("llguidance", "outlines")


def default_schemas() -> Path:
    """JSONSchemaBench's dev sample in ``shared/`` beside the checkout (pass ``--schemas`` for another)."""
    return Path(__file__).resolve().parents[2] / "shared/jsonschemabench/dev_sample.jsonl"


def _worker(backend, conn, memory_gb: float) -> None:
    from sglite.constraints import ConstraintError, backend_processor

    limit = int(memory_gb * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    warnings.simplefilter("ignore")
    while True:
        schema = conn.recv()
        if schema is None:
            return
        outcome = None
        for lenient in (False, True):
            start = time.perf_counter()
            try:
                proc = backend_processor(backend, json_schema=schema, lenient=lenient)
                ms = (time.perf_counter() - start) * 1e3
                outcome = ("lenient" if lenient else "strict", "; ".join(proc.warnings)[:300], ms)
                break
            except ConstraintError as exc:
                ms = (time.perf_counter() - start) * 1e3
                outcome = ("refused", str(exc)[:300], ms)
            except MemoryError:
                outcome = ("refused", "out of memory (--memory-gb)", (time.perf_counter() - start) * 1e3)
                break
        conn.send(outcome)


class Compiler:
    """One backend in a child process; restarted (from the same parent state) after a timeout."""

    def __init__(self, backend, timeout: float, memory_gb: float) -> None:
        self.backend, self.timeout, self.memory_gb = backend, timeout, memory_gb
        self._start()

    def _start(self) -> None:
        self.conn, child = mp.get_context("fork").Pipe()
        self.proc = mp.get_context("fork").Process(target=_worker, args=(self.backend, child, self.memory_gb),
                                                   daemon=True)
        self.proc.start()

    def compile(self, schema) -> tuple[str, str, float]:
        self.conn.send(schema)
        if self.conn.poll(self.timeout):
            try:
                return self.conn.recv()
            except EOFError:
                pass
        self.proc.kill()
        self.proc.join()
        self._start()
        return ("timeout", f"over {self.timeout:.0f} s or killed", self.timeout * 1e3)

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(5)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def sample_outputs(model: str, backend_name: str, schemas: list[dict], samples: int, max_new_tokens: int,
                   max_total_tokens: int):
    import jsonschema
    import sglite

    counts = collections.Counter()
    with sglite.Engine(model, grammar_backend=backend_name, max_total_tokens=max_total_tokens,
                       max_running_requests=32) as engine:
        prompts, params = [], []
        for i, schema in enumerate(schemas):
            for k in range(samples):
                prompts.append([{"role": "user", "content": "Reply with one JSON document."}])
                params.append({"json_schema": schema, "temperature": 1.0, "seed": 1000 * i + k,
                               "max_new_tokens": max_new_tokens})
        texts = [engine.tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outs = engine.generate(texts, params)
        for out, param in zip(outs, params):
            if out["meta_info"]["finish_reason"]["type"] == "length":
                counts["truncated"] += 1
                continue
            try:
                validator = jsonschema.validators.validator_for(param["json_schema"], jsonschema.Draft202012Validator)
                validator(param["json_schema"]).validate(json.loads(out["text"]))
                counts["valid"] += 1
            except (ValueError, jsonschema.ValidationError):
                counts["invalid"] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: $SGLITE_MODEL, else the embedded default model)")
    parser.add_argument("--schemas", default=str(default_schemas()))
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--memory-gb", type=float, default=4.0)
    parser.add_argument("--sample", type=int, default=60, help="schemas sampled through the engine (0: none)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--max-total-tokens", type=int, default=16384, help="KV pool of the sampling engine")
    args = parser.parse_args()
    args.model = args.model or default_model_dir()

    from transformers import AutoTokenizer

    from sglite.constraints import make_backend

    rows = [json.loads(line) for line in open(args.schemas)]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    print(f"# {' '.join(sys.argv)}\n# {len(rows)} schemas from {args.schemas}; tokenizer {args.model} "
          f"({len(tokenizer)} tokens); CPU, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    results: dict[str, list[tuple[str, str, float]]] = {}
    for name in args.backends.split(","):
        start = time.perf_counter()
        backend = make_backend(name, tokenizer, len(tokenizer), {tokenizer.eos_token_id})
        print(f"# {name}: one-time vocabulary build {time.perf_counter() - start:.2f} s (not in compile times)")
        compiler = Compiler(backend, args.timeout, args.memory_gb)
        results[name] = [compiler.compile(row["schema"]) for row in rows]
        compiler.close()

    names = list(results)
    print("\n## Compile coverage per subset (strict / lenient-with-warnings / refused / timeout)")
    print("| subset | n | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    subsets = sorted({row["subset"] for row in rows})
    for subset in subsets + ["all"]:
        idx = [i for i, row in enumerate(rows) if subset == "all" or row["subset"] == subset]
        cells = []
        for name in names:
            c = collections.Counter(results[name][i][0] for i in idx)
            cells.append(f"{c['strict']} / {c['lenient']} / {c['refused']} / {c['timeout']}")
        print(f"| {subset} | {len(idx)} | " + " | ".join(cells) + " |")
    print("\n## Compile time, compiled schemas (ms)")
    print("| backend | compiled | median | p95 | max |")
    print("|---|---|---|---|---|")
    for name in names:
        ms = [r[2] for r in results[name] if r[0] in ("strict", "lenient")]
        print(f"| {name} | {len(ms)}/{len(rows)} ({100 * len(ms) / len(rows):.0f}%) | {statistics.median(ms):.1f} | "
              f"{pct(ms, 0.95):.1f} | {max(ms):.1f} |")
    print("\n## Most common refusal reasons")
    for name in names:
        reasons = collections.Counter(r[1].split(":")[0][:70] if r[0] != "refused" else
                                      (r[1].split("(")[0][:90]) for r in results[name] if r[0] in ("refused", "timeout"))
        for reason, count in reasons.most_common(6):
            print(f"- {name}: {count} x {reason}")
    if args.sample:
        print(f"\n## Sampled through the engine on {os.path.basename(args.model)} (3 samples per schema, temperature 1, "
              f"max_new_tokens {args.max_new_tokens}, strict; valid = jsonschema validation of a finished output)")
        print("| backend | schemas | valid | truncated | invalid |")
        print("|---|---|---|---|---|")
        both = [i for i in range(len(rows)) if all(results[n][i][0] == "strict" for n in names)][: args.sample]
        for name in names:
            own = [i for i in range(len(rows)) if results[name][i][0] == "strict" and i not in both]
            sets = {f"first {len(both)} all backends compile strictly": both}
            if own and len(names) > 1:
                sets[f"{len(own[: args.sample // 2])} more only {name} compiles strictly"] = own[: args.sample // 2]
            for label, chosen in sets.items():
                counts = sample_outputs(args.model, name, [rows[i]["schema"] for i in chosen], 3, args.max_new_tokens,
                                        args.max_total_tokens)
                print(f"| {name} | {label} | {counts['valid']} | {counts['truncated']} | {counts['invalid']} |")

if __name__ == "__main__":
    main()
