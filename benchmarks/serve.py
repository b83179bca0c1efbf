"""Online serving: a request-rate sweep over the OpenAI chat endpoint, radix cache on vs off.

    python benchmarks/serve.py [--model PATH] [--rates 4,8,16,inf] [--requests 48] [--max-tokens 16]
    python benchmarks/serve.py --url http://127.0.0.1:30000 --rates 2,4   # an already running server

Chat workload: 4 long system prompts shared by all requests (each request picks one) plus a short
unique user turn, streamed with Poisson arrivals at each rate (``inf``: all at once). Per rate it
prints throughput, time to first token (p50/p99), inter-token latency (p50/p99) and the share of
prompt tokens served from the radix cache; in process, the same sweep runs again with the cache
off and the last column gives the TTFT ratio (off / on) measured side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass

import httpx


@dataclass
class Outcome:
    ttft: float
    itl: list[float]
    completion_tokens: int
    prompt_tokens: int
    cached_tokens: int


def make_workload(n_requests: int, n_systems: int = 4, system_words: int = 250, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    words = "the of and to in is that for it as with was on be by this are from at or an which have not".split()
    topics = "radix cache batching kernel schedule prefix decode token latency memory".split()
    systems = [
        f"System {i}: you are assistant number {i}. " + " ".join(rng.choice(words + topics) for _ in range(system_words))
        for i in range(n_systems)
    ]
    return [
        [
            {"role": "system", "content": rng.choice(systems)},
            {"role": "user", "content": f"Question {i}: explain {rng.choice(topics)} and {rng.choice(topics)}."},
        ]
        for i in range(n_requests)
    ]


async def one_request(client: httpx.AsyncClient, url: str, messages: list[dict], max_tokens: int) -> Outcome:
    body = {
        "model": "bench",
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    token_times: list[float] = []
    usage: dict = {}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                token_times.append(time.perf_counter())
    gaps = [b - a for a, b in zip(token_times, token_times[1:])]
    return Outcome(
        ttft=token_times[0] - start if token_times else float("nan"),
        itl=gaps,
        completion_tokens=usage.get("completion_tokens", 0),
        prompt_tokens=usage.get("prompt_tokens", 0),
        cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
    )


async def sweep_rate(url: str, workload: list[list[dict]], rate: float, max_tokens: int, seed: int) -> dict:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=len(workload), max_keepalive_connections=len(workload))
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        tasks = []
        start = time.perf_counter()
        for messages in workload:
            tasks.append(asyncio.create_task(one_request(client, url, messages, max_tokens)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        outcomes = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    ttfts = sorted(o.ttft for o in outcomes)
    itls = sorted(g for o in outcomes for g in o.itl) or [float("nan")]
    return {
        "req_s": len(outcomes) / elapsed,
        "tok_s": sum(o.completion_tokens for o in outcomes) / elapsed,
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p99": percentile(ttfts, 99),
        "itl_p50": percentile(itls, 50),
        "itl_p99": percentile(itls, 99),
        "hit": sum(o.cached_tokens for o in outcomes) / max(1, sum(o.prompt_tokens for o in outcomes)),
        "prompt_tokens": statistics.mean(o.prompt_tokens for o in outcomes),
    }


def percentile(sorted_values: list[float], p: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


def run_sweep(url: str, rates: list[float], args: argparse.Namespace) -> dict[float, dict]:
    workload = make_workload(args.requests)
    asyncio.run(sweep_rate(url, workload[:2], float("inf"), 2, seed=0))  # warm-up off the clock
    return {rate: asyncio.run(sweep_rate(url, workload, rate, args.max_tokens, seed=1)) for rate in rates}


def sweep_in_process(model: str, rates: list[float], args: argparse.Namespace, **engine_options) -> dict[float, dict]:
    import sglite
    from sglite.runtime.server import ServerConfig
    from sglite.runtime.server.testing import serve_in_thread

    with sglite.Engine(model, **engine_options) as engine, serve_in_thread(engine, ServerConfig(log_level="warning")) as url:
        return run_sweep(url, rates, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the tiny offline Llama)")
    parser.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    parser.add_argument("--rates", default="4,8,16,inf", help="requests per second, comma-separated; inf = all at once")
    parser.add_argument("--requests", type=int, default=48, help="requests per rate")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-total-tokens", type=int, default=32768, help="KV pool size of the in-process engine")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]

    if args.url:
        results = {"server": run_sweep(args.url.rstrip("/"), rates, args)}
    else:
        from sglite.runtime.tiny_model import build_tiny_model

        model = args.model or str(build_tiny_model("llama"))
        results = {
            "cache on": sweep_in_process(model, rates, args, max_total_tokens=args.max_total_tokens),
            "cache off": sweep_in_process(model, rates, args, max_total_tokens=args.max_total_tokens, disable_radix_cache=True),
        }

    first = next(iter(results.values()))[rates[0]]
    print(f"serve: {args.requests} streamed chat requests per rate, ~{first['prompt_tokens']:.0f} prompt tokens "
          f"(4 shared system prompts), {args.max_tokens} new tokens each")
    header = "| rate req/s | setup     | req/s | out tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | cache hit |"
    compare = "cache off" in results
    if compare:
        header += " TTFT p50 off/on |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for rate in rates:
        for name, by_rate in results.items():
            r = by_rate[rate]
            row = (
                f"| {rate:>10} | {name:<9} | {r['req_s']:5.1f} | {r['tok_s']:9.1f} | {r['ttft_p50'] * 1e3:11.1f} | "
                f"{r['ttft_p99'] * 1e3:11.1f} | {r['itl_p50'] * 1e3:10.1f} | {r['itl_p99'] * 1e3:10.1f} | {r['hit']:9.0%} |"
            )
            if compare:
                ratio = results["cache off"][rate]["ttft_p50"] / results["cache on"][rate]["ttft_p50"]
                row += f" {ratio:15.2f}x |" if name == "cache on" else f" {'':>15}  |"
            print(row)


if __name__ == "__main__":
    main()
