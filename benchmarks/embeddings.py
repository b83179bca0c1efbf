"""Embedding throughput against sentence-transformers, and generation streams while embeddings are served.

1. Throughput: ``--sentences`` short sentences embedded by sentence-transformers' ``encode`` (its own
   batching: 32 at a time, sorted by length, padded) and by sglite (one call; packed forwards), on the same
   model folder, threads and dtype (float32), after a warm-up. Falls back to the same recipe in plain
   transformers when sentence-transformers is not installed.
2. No stall: one server holding the generation model and the embedding model (``--embedding-model``);
   ``--streams`` generation streams run alone, then again while a client keeps requesting embeddings of
   ``--batch`` sentences. The table gives the inter-token gaps of the streams in both phases.

    python benchmarks/embeddings.py [--threads 2] [--repeat 5] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, header, min_median, setup, timed  # noqa: E402

import sglite  # noqa: E402

SUBJECTS = ["The cat", "A small company", "My neighbour", "The orchestra", "This old bridge", "Our new model", "The river", "A tired student"]
VERBS = ["quietly crossed", "bought", "painted", "rebuilt", "described", "ignored", "measured", "celebrated"]
OBJECTS = ["the empty street", "a red bicycle", "three ancient maps", "the annual report", "its own shadow",
           "a forgotten song", "the winter garden", "every single invoice in the drawer"]


def short_sentences(count: int) -> list[str]:
    """``count`` distinct short sentences (5-12 words)."""
    return [f"{SUBJECTS[i % 8]} {VERBS[(i // 8) % 8]} {OBJECTS[(i // 64 + i) % 8]} on day {i}." for i in range(count)]


def sentence_transformers_encoder(model_dir: str):
    """``encode(texts)`` by sentence-transformers, or by its recipe in plain transformers when it is absent."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        SentenceTransformer = None
    if SentenceTransformer is not None:
        model = SentenceTransformer(model_dir, device="cpu")
        return "sentence-transformers encode (batch 32)", lambda texts: model.encode(texts, batch_size=32)
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()

    @torch.inference_mode()
    def encode(texts: list[str]) -> torch.Tensor:
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = []
        for start in range(0, len(texts), 32):
            batch = tokenizer([texts[i] for i in order[start : start + 32]], padding=True, truncation=True, max_length=256, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"][..., None].float()
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(out)

    return "sentence-transformers recipe in transformers (batch 32)", encode


def throughput(model_dir: str, count: int, repeat: int) -> None:
    texts = short_sentences(count)
    threads = torch.get_num_threads()
    name, reference = sentence_transformers_encoder(model_dir)
    engine = sglite.Engine(model_dir, num_threads=threads)
    rows = {
        name: reference,
        "sglite Embedder.embed (tensor)": lambda t: engine.embedder.embed(t).vectors,
        "sglite Engine.encode (lists)": engine.encode,
    }
    results = {}
    for label, encode in rows.items():
        encode(texts)  # warm-up
        results[label], _ = timed(lambda: encode(texts), repeat)
    tokens = sum(len(ids) for ids in engine.tokenizer(texts)["input_ids"])
    print(header(f"embedding throughput: {Path(model_dir).name}, {count} short sentences ({tokens} tokens)", "cpu", "float32", repeat,
                 cpu_line()))
    base = statistics.median(results[name])
    print(f"| {'setup':<56} | {'wall s':>15} | {'sentences/s (median)':>20} | {'vs sentence-transformers':>24} |")
    print(f"|{'-' * 58}|{'-' * 17}|{'-' * 22}|{'-' * 26}|")
    for label, times in results.items():
        median = statistics.median(times)
        print(f"| {label:<56} | {min_median(times):>15} | {count / median:20.1f} | {base / median:23.2f}x |")


def cpu_line() -> str:
    """The CPU model and its vector ISA flags (from /proc/cpuinfo where there is one)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "cpu: unknown"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    isa = [f for f in flags if f.startswith(("avx", "amx", "fma", "sse4_2"))]
    return f"cpu: {model}; ISA: {' '.join(sorted(isa))}"


def stream_gaps(url: str, prompt: str, max_new_tokens: int, gaps: list[float]) -> None:
    """Run one streamed /generate request; append the seconds between its consecutive chunks to ``gaps``."""
    import httpx

    body = {"text": prompt, "stream": True, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}}
    last = None
    with httpx.stream("POST", f"{url}/generate", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now


def no_stall(gen_model: str, embedding_model: str, streams: int, max_new_tokens: int, batch: int) -> None:
    import httpx

    from sglite.runtime.server.testing import serve_in_thread

    threads = torch.get_num_threads()
    engine = sglite.Engine(gen_model, embedding_model=embedding_model, num_threads=threads, max_total_tokens=8192)
    texts = short_sentences(batch)
    rows = []
    with serve_in_thread(engine) as url:
        stream_gaps(url, "Warm up.", 4, [])
        httpx.post(f"{url}/v1/embeddings", json={"input": texts}, timeout=600)
        for phase in ("generation alone", f"while embedding {batch} sentences per request"):
            gaps: list[float] = []
            workers = [threading.Thread(target=stream_gaps, args=(url, f"Story {i}: once upon a time", max_new_tokens, gaps))
                       for i in range(streams)]
            done = threading.Event()
            served = [0]

            def embed_until_done() -> None:
                with httpx.Client(timeout=600) as client:
                    while not done.is_set():
                        client.post(f"{url}/v1/embeddings", json={"input": texts}).raise_for_status()
                        served[0] += 1

            embedder = threading.Thread(target=embed_until_done) if phase != "generation alone" else None
            for worker in workers:
                worker.start()
            if embedder is not None:
                embedder.start()
            for worker in workers:
                worker.join()
            done.set()
            if embedder is not None:
                embedder.join()
            rows.append((phase, gaps, served[0]))
    engine.shutdown()
    print()
    print(f"no stall: {streams} streams x {max_new_tokens} tokens on {Path(gen_model).name}, same server as {Path(embedding_model).name}; "
          f"gaps between streamed chunks, ms")
    print(f"| {'phase':<44} | {'p50 gap':>8} | {'p99 gap':>8} | {'max gap':>8} | {'embedding requests':>18} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 20}|")
    for phase, gaps, served in rows:
        ordered = sorted(gaps)
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        print(f"| {phase:<44} | {1e3 * statistics.median(gaps):8.1f} | {1e3 * p99:8.1f} | {1e3 * max(gaps):8.1f} | {served:>18} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embedding-model", default=None, help="embedding model folder (default: the embedded all-MiniLM-L6-v2)")
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64, help="sentences per embedding request in the no-stall phase")
    parser.add_argument("--skip-stall", action="store_true", help="throughput only")
    add_common_args(parser, repeat=5)
    args = parser.parse_args(argv)
    gen_model, _, _ = setup(args)
    if args.quick:
        args.sentences, args.streams, args.max_new_tokens, args.batch = 32, 2, 16, 16
    if args.embedding_model is None:
        from sglite.runtime.loading.default_model import default_embedding_model_path

        args.embedding_model = str(default_embedding_model_path())
    throughput(args.embedding_model, args.sentences, args.repeat)
    if not args.skip_stall:
        no_stall(gen_model, args.embedding_model, args.streams, args.max_new_tokens, args.batch)


if __name__ == "__main__":
    main()
