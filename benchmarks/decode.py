"""Decode and prefill speed on the default model: sglite in each weight format next to transformers
``generate`` and llama.cpp (llama-cpp-python) on the same weights, plus the memory-bandwidth bound.

    python benchmarks/decode.py [--model PATH] [--gguf PATH] [--threads 1] [--reps 3] [--new-tokens 32]

Every runner gets the same threads, the same token ids, and the same stopping rule (exactly
``--new-tokens`` greedy tokens, EOS ignored), one warm-up, then ``--reps`` interleaved
repetitions (min and median printed). Decode tok/s is measured as ``B * (N - 1) / (t(N) - t(1))``
(generating N tokens minus generating one, so prompt processing cancels out); prefill tok/s as
``prompt tokens / t(1)`` on a ``--prompt-tokens`` prompt, with sglite's radix cache off so each
repetition computes the whole prompt. The ``llama-bench`` column is llama.cpp built natively for this CPU
(``../shared/tools/build_llama_cpp.sh``, or ``--llama-bench PATH``) timing its own decode (``-p 0 -n N``) and
prefill (``-p P -n 0``) with the same threads and repetitions. The llama.cpp column runs one sequence at a time through
llama-cpp-python's ``eval``/``sample``; its batched rows are left empty, and the whole column is
skipped with a message when the package (the ``bench`` extra) is absent.

The bandwidth bound is ``measured read bandwidth / weight bytes read per token`` at batch 1. A
quality table follows: how far each format's greedy output drifts from float32 (share of greedy
tokens equal to float32's, position by position, and perplexity of float32's own continuations).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import sglite
from _common import cpu_description, llama_cpp_tool

QUESTIONS = [
    "Write a short poem about the sea.", "What is the capital of France?", "List three uses of a paperclip.",
    "Explain what a hash table is.", "Give me a recipe for pancakes.", "Why is the sky blue?",
    "Summarize the plot of Hamlet.", "How do vaccines work?",
]


def default_model() -> str:
    if os.environ.get("SGLITE_REAL_MODEL"):
        return os.environ["SGLITE_REAL_MODEL"]
    from sglite.runtime.loading.default_model import default_gguf_path

    return str(default_gguf_path())


def default_gguf() -> str | None:
    try:
        from sglite.runtime.loading.default_model import default_gguf_path

        return str(default_gguf_path())
    except Exception:  # noqa: BLE001 - the llama.cpp column is optional
        return None


@dataclass
class Runner:
    """One column: ``generate(prompts, n)`` produces exactly ``n`` greedy tokens for each prompt."""

    name: str
    generate: Callable[[list[list[int]], int], None]
    weight_bytes: int
    max_batch: int = 1 << 30
    times: dict[str, list[float]] = field(default_factory=dict)


def sglite_runner(model: str, name: str, threads: int, **options) -> tuple[Runner, sglite.Engine]:
    engine = sglite.Engine(model, disable_radix_cache=True, num_threads=threads, max_total_tokens=32768, **options)

    def generate(prompts: list[list[int]], n: int) -> None:
        params = {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        assert all(len(o["output_ids"]) == n for o in outs)

    weight_bytes = decode_weight_bytes(engine.runner.model)
    return Runner(name, generate, weight_bytes), engine


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Weight bytes one batch-1 decode step reads: every linear layer (the output head included,
    tied or not) and the norms; of the embedding, one row (ignored)."""
    from sglite.runtime.kernels.packed_linear import PackedLinear
    from sglite.runtime.kernels.quant_linear import QuantEmbedding, QuantLinear
    from sglite.runtime.loading.quantization import QuantizedLinear

    total = 0
    for module in model.modules():
        if isinstance(module, (QuantizedLinear, PackedLinear)):
            total += module.kernel_bytes()
        elif isinstance(module, QuantLinear):  # ggml blocks (a tied head reads the embedding's blocks)
            total += module.weight_bytes
        elif not isinstance(module, (torch.nn.Embedding, QuantEmbedding)):
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    return total


def transformers_runner(model: str, dtype: torch.dtype, pad_id: int) -> Runner:
    from transformers import AutoModelForCausalLM

    from sglite.runtime.loading.gguf_loader import transformers_source

    path, kwargs = transformers_source(model)  # a GGUF's folder holds no weights: transformers reads the file
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval()

    @torch.inference_mode()
    def generate(prompts: list[list[int]], n: int) -> None:
        width = max(map(len, prompts))  # left-padded batch, as transformers batches
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = hf.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad_id
        )
        assert out.shape[1] == width + n

    weight_bytes = decode_weight_bytes(hf)
    return Runner(f"transformers {str(dtype).removeprefix('torch.')}", generate, weight_bytes)


def llama_cpp_runner(gguf: str | None, threads: int) -> Runner | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama.cpp column skipped: llama-cpp-python is not installed (pip install 'sglite[bench]')")
        return None
    if gguf is None or not Path(gguf).exists():
        print(f"llama.cpp column skipped: no GGUF file ({gguf})")
        return None
    llm = Llama(model_path=gguf, n_ctx=4096, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)

    def generate(prompts: list[list[int]], n: int) -> None:
        for prompt in prompts:
            llm.reset()  # no reuse of the previous prompt's KV
            llm.eval(prompt)
            for _ in range(n):
                token = llm.sample(top_k=1, temp=0.0)
                if _ < n - 1:
                    llm.eval([token])

    return Runner(f"llama.cpp {Path(gguf).stem.split('.')[-1]}", generate, Path(gguf).stat().st_size, max_batch=1)


def llama_bench_runner(binary: Path | None, gguf: str | None, threads: int, args) -> Runner | None:
    """The native llama.cpp column: ``llama-bench`` runs its own repetitions (``tg`` = decode, ``pp`` = prefill)."""
    if binary is None or not binary.exists() or gguf is None:
        print(f"llama-bench column skipped: no binary ({binary}) or no GGUF ({gguf})")
        return None
    import json
    import subprocess

    def bench(prompt: int, new: int) -> list[float]:
        command = [str(binary), "-m", gguf, "-t", str(threads), "-p", str(prompt), "-n", str(new), "-r", str(args.reps), "-o", "json"]
        run = subprocess.run(command, capture_output=True, text=True, check=True)
        return [float(v) for v in json.loads(run.stdout)[0]["samples_ts"]]

    runner = Runner(f"llama-bench {Path(gguf).stem.split('.')[-1]}", lambda prompts, n: None, Path(gguf).stat().st_size, max_batch=0)
    runner.times["decode, batch 1"] = bench(0, args.new_tokens)
    runner.times[f"prefill, {args.prompt_tokens}-token prompt"] = bench(args.prompt_tokens, 0)
    return runner


def read_bandwidth(nbytes: int = 512 * 2**20) -> float:
    """Bytes/s of a streaming read (a sum over a buffer far larger than the caches), best of 5."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def prompts_of(tokenizer, count: int) -> list[list[int]]:
    chats = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" ({i})"}] for i in range(count)]
    return [list(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)) for c in chats]


def long_prompt(tokenizer, length: int) -> list[int]:
    text = " ".join(f"Sentence {i} of a long document about {QUESTIONS[i % len(QUESTIONS)].lower()}" for i in range(length))
    return tokenizer.encode(text)[:length]


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):7.1f} ({max(values):.1f})" if values else "      —"


def speed_table(runners: list[Runner], tokenizer, args) -> None:
    batches = [int(b) for b in args.batches.split(",")]
    long = long_prompt(tokenizer, args.prompt_tokens)
    cases = {f"decode, batch {b}": prompts_of(tokenizer, b) for b in batches}
    live = [r for r in runners if r.max_batch > 0]  # llama-bench rows come measured
    for r in live:  # warm-up: every shape once
        for prompts in cases.values():
            if len(prompts) <= r.max_batch:
                r.generate(prompts, 2)
        r.generate([long], 1)
    for _ in range(args.reps):
        for r in live:
            for case, prompts in cases.items():
                if len(prompts) > r.max_batch:
                    continue
                full, first = timed(lambda: r.generate(prompts, args.new_tokens)), timed(lambda: r.generate(prompts, 1))
                r.times.setdefault(case, []).append(len(prompts) * (args.new_tokens - 1) / max(full - first, 1e-9))
            r.times.setdefault(f"prefill, {len(long)}-token prompt", []).append(len(long) / timed(lambda: r.generate([long], 1)))

    bandwidth = read_bandwidth()
    width = max(len(r.name) for r in runners) + 2
    print(f"\nCPU: {cpu_description()}")
    print(f"tok/s, median (best) of {args.reps}; {args.new_tokens} new tokens; torch threads {args.threads}; "
          f"read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print("| case".ljust(32) + "".join(f"| {r.name}".ljust(width + 2) for r in runners) + "|")
    print("|" + "-" * 31 + ("|" + "-" * (width + 1)) * len(runners) + "|")
    for case in [*cases, f"prefill, {len(long)}-token prompt"]:
        print(f"| {case}".ljust(32) + "".join(f"| {fmt(r.times.get(case, []))}".ljust(width + 2) for r in runners) + "|")
    print(f"| weight MiB read per token".ljust(32) + "".join(f"| {r.weight_bytes / 2**20:7.1f}".ljust(width + 2) for r in runners) + "|")
    print(f"| bandwidth bound, batch 1".ljust(32) + "".join(f"| {bandwidth / r.weight_bytes:7.1f}".ljust(width + 2) for r in runners) + "|")
    single = "decode, batch 1"
    if single in cases:
        print(f"| batch 1: % of bound".ljust(32) + "".join(
            f"| {100 * statistics.median(r.times[single]) * r.weight_bytes / bandwidth:6.0f}%".ljust(width + 2)
            for r in runners) + "|")
    base = next((r for r in runners if r.name.startswith("transformers")), None)
    cpp = next((r for r in runners if r.name.startswith("llama.cpp")), None)
    native = next((r for r in runners if r.name.startswith("llama-bench")), None)
    for ref in (base, cpp, native):
        if ref is None:
            continue
        print(f"\nratios of medians against {ref.name} (>1: faster)")
        for case in ref.times:
            cells = ", ".join(
                f"{r.name} {statistics.median(r.times[case]) / statistics.median(ref.times[case]):.2f}x"
                for r in runners if r is not ref and r.name.startswith("sglite") and case in r.times
            )
            print(f"  {case}: {cells}")


def quality_table(model: str, formats: list[tuple[str, dict]], tokenizer, new_tokens: int) -> None:
    """Greedy tokens equal to float32's (position by position) and perplexity of float32's outputs."""
    prompts = prompts_of(tokenizer, 8)
    params = {"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
    with sglite.Engine(model, dtype="float32", max_total_tokens=8192) as engine:
        reference = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)]
    print(f"\nquality against float32 greedy: {len(prompts)} chat prompts x {new_tokens} tokens")
    print("| format                 | greedy tokens equal to float32 | perplexity of float32's continuations |")
    print("|------------------------|--------------------------------|---------------------------------------|")
    for name, options in [("sglite float32", {"dtype": "float32"}), *formats]:
        with sglite.Engine(model, max_total_tokens=8192, **options) as engine:
            outs = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)]
            scored = engine.generate(
                input_ids=[p + r for p, r in zip(prompts, reference)],
                sampling_params={"max_new_tokens": 0},
                return_logprob=True,
                logprob_start_len=0,
            )
        equal = sum(a == b for o, r in zip(outs, reference) for a, b in zip(o, r)) / (len(prompts) * new_tokens)
        logprobs = [lp for s, r in zip(scored, reference) for lp, _, _ in s["meta_info"]["input_token_logprobs"][-len(r):]]
        ppl = float(torch.tensor(logprobs).mean().neg().exp())
        print(f"| {name:<22} | {100 * equal:29.1f}% | {ppl:37.3f} |")


def format_options(name: str) -> dict:
    """Engine options of a ``--formats`` entry: ``default`` (no options: a GGUF in its own blocks), ``bfloat16``,
    ``int4``, ``int4+compile``, ..."""
    weights, _, extra = name.partition("+")
    if weights == "default":
        return {"enable_torch_compile": True} if extra == "compile" else {}
    if extra not in ("", "compile"):
        raise SystemExit(f"unknown format suffix {extra!r} in {name!r} (only +compile)")
    options = {"quantization": weights, "dtype": "bfloat16"} if weights in ("int8", "int4") else {"dtype": weights}
    if extra == "compile":
        options["enable_torch_compile"] = True
    return options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint for sglite and transformers (default: the default model)")
    parser.add_argument("--gguf", default=None, help="GGUF for llama.cpp (default: the packaged default model)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument(
        "--formats",
        default="default,float32,bfloat16",
        help="sglite columns: default (no options), bfloat16, float32, int8, int4, each optionally +compile",
    )
    parser.add_argument("--no-quality", action="store_true", help="skip the quality table")
    parser.add_argument("--llama-bench", default=None, help="llama-bench binary (default: ../shared/tools/build_llama_cpp.sh's build)")
    parser.add_argument("--no-llama-bench", action="store_true", help="skip the native llama-bench column")
    args = parser.parse_args()
    model = args.model or default_model()
    torch.set_num_threads(args.threads)  # this script's own thread (transformers); engines get num_threads

    engines, runners = [], []
    for fmt_name in args.formats.split(","):
        runner, engine = sglite_runner(model, f"sglite {fmt_name}", args.threads, **format_options(fmt_name))
        runners.append(runner)
        engines.append(engine)
    tokenizer = engines[0].tokenizer
    # transformers reads the same weights, dequantized to a dense float32 model (from a GGUF: the file itself)
    runners.append(transformers_runner(engines[0].model_path, torch.float32, tokenizer.pad_token_id or 0))
    cpp = llama_cpp_runner(args.gguf or default_gguf(), args.threads)
    if cpp is not None:
        runners.append(cpp)
    if not args.no_llama_bench:
        native = llama_bench_runner(llama_cpp_tool("llama-bench", args.llama_bench), args.gguf or default_gguf(), args.threads, args)
        if native is not None:
            runners.append(native)
    try:
        speed_table(runners, tokenizer, args)
    finally:
        for engine in engines:
            engine.shutdown()
    if not args.no_quality:
        formats = [(f"sglite {f}", format_options(f)) for f in args.formats.split(",") if f != "float32" and "+" not in f]
        quality_table(model, formats, tokenizer, args.new_tokens * 2)


if __name__ == "__main__":
    main()
