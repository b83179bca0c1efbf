"""Online serving: a request-rate sweep over the OpenAI chat endpoint, radix cache on vs off.

    python benchmarks/serve.py [--model PATH] [--rates 4,8,16,inf] [--requests 48] [--max-tokens 16] [--repeat 2]
    python benchmarks/serve.py --url http://127.0.0.1:30000 --rates 2,4   # an already running server
    python benchmarks/serve.py --quick                  # rate inf, 8 requests x 8 tokens, 2 repetitions

Chat workload: 4 long system prompts shared by all requests (each request picks one) plus a short user
turn that is unique to its request, its rate and its repetition (no request is ever repeated), streamed
with Poisson arrivals at each rate (``inf``: all at once). The radix cache is flushed before every rate
and repetition, so each row starts cold and only the shared system prompts can hit. Per rate it prints
throughput, time to first token (p50 as min / median over repetitions, p99), inter-token latency
(p50/p99) and the share of prompt tokens served from the cache; in process, the same sweep runs again
with the cache off, on the same device and dtype, and the last column gives the TTFT ratio (off / on).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, engine_options, header, setup  # noqa: E402


@dataclass
class Outcome:
    ttft: float
    itl: list[float]
    completion_tokens: int
    prompt_tokens: int
    cached_tokens: int


TOPICS = "radix cache batching kernel schedule prefix decode token latency memory".split()


def make_workload(n_requests: int, round_id: str, n_systems: int = 4, system_words: int = 250) -> list[list[dict]]:
    """``n_requests`` chats: one of the shared system prompts (the same in every round) and a user turn
    unique to ``round_id`` (a rate and repetition), so nothing but the system prompts can come from the cache."""
    rng = random.Random(0)
    words = "the of and to in is that for it as with was on be by this are from at or an which have not".split()
    systems = [
        f"System {i}: you are assistant number {i}. " + " ".join(rng.choice(words + TOPICS) for _ in range(system_words))
        for i in range(n_systems)
    ]
    turns = random.Random(round_id)
    return [
        [
            {"role": "system", "content": turns.choice(systems)},
            {"role": "user", "content": f"Round {round_id}, question {i}: explain {turns.choice(TOPICS)} "
                                        f"and {turns.choice(TOPICS)} in {turns.randrange(10**6)} words."},
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


def median_row(repetitions: list[dict]) -> dict:
    """The median of each metric over repetitions, plus the fastest TTFT p50."""
    row = {key: statistics.median(r[key] for r in repetitions) for key in repetitions[0]}
    row["ttft_p50_min"] = min(r["ttft_p50"] for r in repetitions)
    return row


def percentile(sorted_values: list[float], p: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


def run_sweep(url: str, rates: list[float], args: argparse.Namespace) -> dict[float, list[dict]]:
    """Per rate, one result per repetition; the cache is flushed before each."""
    asyncio.run(sweep_rate(url, make_workload(2, "warm-up"), float("inf"), 2, seed=0))  # warm-up off the clock
    results: dict[float, list[dict]] = {}
    for rate in rates:
        for rep in range(args.repeat):
            flushed = httpx.post(f"{url}/flush_cache", timeout=60)
            flushed.raise_for_status()
            workload = make_workload(args.requests, f"{rate}/{rep}")
            results.setdefault(rate, []).append(asyncio.run(sweep_rate(url, workload, rate, args.max_tokens, seed=rep)))
    return results


def sweep_in_process(model: str, rates: list[float], args: argparse.Namespace, **engine_options) -> dict[float, dict]:
    import sglite
    from sglite.runtime.server import ServerConfig
    from sglite.runtime.server.testing import serve_in_thread

    with sglite.Engine(model, **engine_options) as engine, serve_in_thread(engine, ServerConfig(log_level="warning")) as url:
        return run_sweep(url, rates, args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    parser.add_argument("--rates", default="4,8,16,inf", help="requests per second, comma-separated; inf = all at once")
    parser.add_argument("--requests", type=int, default=48, help="requests per rate")
    parser.add_argument("--max-tokens", type=int, default=16)
    add_common_args(parser, repeat=2)
    args = parser.parse_args(argv)
    if args.quick:
        args.rates, args.requests, args.max_tokens = "inf", 8, 8
    rates = [float(r) for r in args.rates.split(",")]

    if args.url:
        device = dtype = "(the server's)"
        results = {"server": run_sweep(args.url.rstrip("/"), rates, args)}
        name = args.url
    else:
        model, device, dtype = setup(args)
        options = engine_options(args, device, dtype)
        results = {
            "cache on": sweep_in_process(model, rates, args, **options),
            "cache off": sweep_in_process(model, rates, args, disable_radix_cache=True, **options),
        }
        name = Path(model).name
    results = {setup_name: {rate: median_row(reps) for rate, reps in by_rate.items()} for setup_name, by_rate in results.items()}

    first = next(iter(results.values()))[rates[0]]
    print(header(f"serve: {name}, {args.requests} streamed chat requests per rate and repetition, "
                 f"~{first['prompt_tokens']:.0f} prompt tokens (4 shared system prompts, unique user turns), "
                 f"{args.max_tokens} new tokens each; cache flushed before every rate", device, dtype, args.repeat,
                 "TTFT p50 is min / median over repetitions; the other columns are medians"))
    columns = "| rate req/s | setup     | req/s | out tok/s | TTFT p50 ms   | TTFT p99 ms | ITL p50 ms | ITL p99 ms | cache hit |"
    compare = "cache off" in results
    if compare:
        columns += " TTFT p50 off/on |"
    print(columns)
    print("|" + "|".join("-" * (len(c)) for c in columns.split("|")[1:-1]) + "|")
    for rate in rates:
        for name, by_rate in results.items():
            r = by_rate[rate]
            row = (
                f"| {rate:>10} | {name:<9} | {r['req_s']:5.1f} | {r['tok_s']:9.1f} | {r['ttft_p50_min'] * 1e3:5.0f} / {r['ttft_p50'] * 1e3:5.0f} | "
                f"{r['ttft_p99'] * 1e3:11.1f} | {r['itl_p50'] * 1e3:10.1f} | {r['itl_p99'] * 1e3:10.1f} | {r['hit']:9.0%} |"
            )
            if compare:
                ratio = results["cache off"][rate]["ttft_p50"] / results["cache on"][rate]["ttft_p50"]
                row += f" {ratio:15.2f}x |" if name == "cache on" else f" {'':>15}  |"
            print(row)


if __name__ == "__main__":
    main()
