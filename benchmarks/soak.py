"""Soak: healthy streams under a hostile mix, mid-stream disconnects and a SIGTERM at the end.

    python benchmarks/soak.py [--model PATH] [--duration 60] [--clients 16] [--json soak.json]

Starts ``python -m sglite serve`` as a subprocess (with an API key, short slow-client deadlines) and,
for ``--duration`` seconds, runs side by side:

- ``--clients`` healthy clients, each streaming chat completions back to back;
- one hostile client cycling through the categories of issue 9 (tiny temperature, a 1e-40 repetition
  penalty, stop tokens covering the vocabulary with ``min_new_tokens``, out-of-vocabulary stop ids,
  ``prompt=123``, a multi-megabyte prompt, broken JSON, a wrong key, a body shorter than its
  Content-Length, a 20-alternative logprob stream) and holding slow-header sockets open;
- one client that opens streams and drops them after a few events;
- a ``/health`` poller and an RSS sampler.

Then it waits for the engine to go idle, counts leaked KV slots, opens a few streams and sends
SIGTERM: those must end with an error event and ``[DONE]``, and the server must exit 0. It prints
completed / failed healthy requests, 5xx responses, leaked slots, RSS (baseline, peak, growth),
``/health`` p50/p99 and the healthy streams' largest inter-token gap. Targets (from the issue):
0 failed, 0 5xx, 0 leaked, RSS growth < 200 MB, /health p99 < 100 ms, max gap < 250 ms.

For a long run (``--duration 600``) it also shows whether memory plateaus: RSS every ``--sample-every``
seconds next to the resident part of the KV pool (which fills up to ``--max-total-tokens`` as the radix
cache keeps prompts), the growth in each half of the run, and the load average (the timing targets only
mean something on an otherwise idle machine). docs/hardening.md has the latest results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from sglite.runtime.server.testing import free_port, wait_healthy

API_KEY = "sk-soak"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class Report:
    completed: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    server_errors: int = 0
    hostile: Counter = field(default_factory=Counter)
    """(category, status) -> count."""
    unexpected: list[str] = field(default_factory=list)
    disconnects: int = 0
    health_ms: list[float] = field(default_factory=list)
    max_gap_ms: float = 0.0
    rss_baseline_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_peak_mb: float = 0.0
    rss_series: list[tuple[float, float, float]] = field(default_factory=list)
    """(seconds into the load, process RSS MB, RSS MB of the KV pool's mapping), every ``--sample-every`` s."""
    kv_pool_mb: float = 0.0
    end_stats: dict = field(default_factory=dict)
    leaked_slots: int | None = None
    sigterm_streams_ended: int = 0
    sigterm_streams: int = 0
    exit_code: int | None = None
    streams_ended_s: float = 0.0
    exit_s: float = 0.0

    def summary(self) -> dict:
        health = sorted(self.health_ms) or [0.0]
        return {
            "completed": self.completed,
            "failed": self.failed,
            "5xx": self.server_errors,
            "leaked_slots": self.leaked_slots,
            "rss_baseline_mb": round(self.rss_baseline_mb, 1),
            "rss_peak_mb": round(self.rss_peak_mb, 1),
            "rss_growth_mb": round(self.rss_end_mb - self.rss_baseline_mb, 1),
            **self.plateau(),
            "health_p50_ms": round(health[len(health) // 2], 2),
            "health_p99_ms": round(health[min(len(health) - 1, int(len(health) * 0.99))], 2),
            "health_checks": len(self.health_ms),
            "max_token_gap_ms": round(self.max_gap_ms, 1),
            "hostile_requests": sum(self.hostile.values()),
            "unexpected_hostile": len(self.unexpected),
            "disconnects": self.disconnects,
            "sigterm_streams_ended_cleanly": f"{self.sigterm_streams_ended}/{self.sigterm_streams}",
            "sigterm_streams_ended_s": round(self.streams_ended_s, 2),
            "exit_code": self.exit_code,
            "exit_s": round(self.exit_s, 2),
        }


    def plateau(self) -> dict:
        """RSS growth in the first and the second half of the load, and how much of it is the KV pool's pages
        being touched for the first time (bounded by the configured pool; the rest is the process's own)."""
        if len(self.rss_series) < 4:
            return {}
        mid = self.rss_series[len(self.rss_series) // 2]
        last = self.rss_series[-1]
        return {
            "rss_growth_first_half_mb": round(mid[1] - self.rss_baseline_mb, 1),
            "rss_growth_second_half_mb": round(last[1] - mid[1], 1),
            "kv_pool_mb": round(self.kv_pool_mb, 1),
            "kv_pool_resident_mb": last[2],
            "non_kv_growth_second_half_mb": round((last[1] - last[2]) - (mid[1] - mid[2]), 1),
            "radix_cached_tokens": self.end_stats.get("cached_tokens_in_tree"),
        }


def rss_mb(pid: int, field_name: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def kv_arena_rss_mb(pid: int, kv_pool_mb: float) -> float:
    """Resident MB of the KV pool's anonymous mapping (found in /proc/PID/smaps by its size): its pages are
    first touched as slots are first written, so it grows under load up to the configured pool size."""
    if kv_pool_mb <= 0:
        return 0.0
    size_kb = rss_kb = 0
    best = 0.0
    try:
        with open(f"/proc/{pid}/smaps") as smaps:
            for line in smaps:
                if line.startswith("Size:"):
                    size_kb = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss_kb = int(line.split()[1])
                    # the arena is the pool rounded up to whole 2 MB pages
                    if kv_pool_mb <= size_kb / 1024 < kv_pool_mb + 2.01:
                        best = max(best, rss_kb / 1024)
    except OSError:
        return 0.0
    return best


def start_server(model: str, port: int, max_total_tokens: int) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "sglite", "serve", "--model", model, "--port", str(port), "--api-key", API_KEY,
        "--max-total-tokens", str(max_total_tokens), "--log-level", "critical",
        "--header-timeout", "3", "--body-timeout", "2", "--graceful-shutdown-timeout", "1",
    ]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict, gaps: list[float] | None = None, drop_after: int | None = None) -> tuple[int, list[dict]]:
    """POST a streamed chat completion; (status, events). Records inter-token gaps; drops the connection early on request."""
    events: list[dict] = []
    async with client.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, headers=AUTH) as response:
        if response.status_code != 200:
            await response.aread()
            return response.status_code, [response.json()]
        last = None
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            events.append({"done": True} if data == "[DONE]" else json.loads(data))
            now = time.perf_counter()
            if gaps is not None and "choices" in events[-1] and events[-1]["choices"] and events[-1]["choices"][0]["delta"].get("content"):
                if last is not None:
                    gaps.append(now - last)
                last = now
            if drop_after is not None and len(events) >= drop_after:
                return 200, events  # leaving the block closes the connection mid-stream
    return 200, events


async def healthy_client(i: int, url: str, stop: asyncio.Event, report: Report, max_tokens: int) -> None:
    async with httpx.AsyncClient(timeout=120) as client:
        n = 0
        while not stop.is_set():
            n += 1
            body = {"messages": [{"role": "user", "content": f"client {i} request {n}"}], "max_tokens": max_tokens, "ignore_eos": True}
            gaps: list[float] = []
            try:
                status, events = await stream_chat(client, url, body, gaps)
            except httpx.HTTPError as exc:
                report.failed += 1
                report.failures.append(f"client {i}: {type(exc).__name__}: {exc}")
                continue
            ok = status == 200 and events and events[-1].get("done") and not any("error" in e for e in events)
            finish = [e["choices"][0]["finish_reason"] for e in events if e.get("choices") and e["choices"][0].get("finish_reason")]
            if ok and finish == ["length"]:
                report.completed += 1
                report.max_gap_ms = max([report.max_gap_ms] + [g * 1000 for g in gaps])
            else:
                report.failed += 1
                report.server_errors += status >= 500
                report.failures.append(f"client {i}: status {status}, last events {events[-2:]}")


def hostile_cases(vocab: int) -> list[tuple[str, str, object, set[int]]]:
    """(category, path, JSON body or raw bytes, acceptable statuses)."""
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 16}
    return [
        ("tiny temperature", "/v1/chat/completions", {**chat, "temperature": 1e-38}, {200}),
        ("repetition_penalty 1e-40", "/v1/chat/completions", {**chat, "temperature": 1.0, "repetition_penalty": 1e-40}, {200}),
        ("stop ids cover vocab", "/generate", {"text": "x", "sampling_params": {"max_new_tokens": 8, "min_new_tokens": 4, "stop_token_ids": list(range(vocab))}}, {400}),
        ("out-of-vocab stop id", "/generate", {"text": "x", "sampling_params": {"max_new_tokens": 8, "stop_token_ids": [vocab + 10]}}, {400}),
        ("prompt=123", "/v1/completions", {"prompt": 123}, {400}),
        ("4 MB prompt", "/v1/completions", {"prompt": "y" * 4_000_000, "max_tokens": 1}, {400}),
        ("broken JSON", "/v1/completions", b'{"prompt": "x", ', {400}),
        ("wrong key", "/v1/models", None, {401}),
        ("top_logprobs 20 stream", "/v1/chat/completions", {**chat, "max_tokens": 200, "ignore_eos": True, "logprobs": True, "top_logprobs": 20, "stream": True}, {200}),
    ]


async def short_body(host: str, port: int) -> int:
    """A body shorter than its Content-Length: the server must answer 408 after its body deadline."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"prompt")
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 30)
    writer.close()
    return int(line.split()[1]) if line else 0


async def slowloris(host: str, port: int, count: int, stop: asyncio.Event) -> None:
    """Keep ``count`` sockets sending half a request head; the server's head deadline must close them."""
    while not stop.is_set():
        writers = []
        for _ in range(count):
            try:
                _, writer = await asyncio.open_connection(host, port)
                writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                writers.append(writer)
            except OSError:
                break
        await asyncio.sleep(2.0)
        for writer in writers:
            writer.close()


async def hostile_client(url: str, stop: asyncio.Event, report: Report, vocab: int) -> None:
    host, port = url.removeprefix("http://").split(":")
    cases = hostile_cases(vocab)
    async with httpx.AsyncClient(timeout=120) as client:
        i = 0
        while not stop.is_set():
            category, path, body, allowed = cases[i % len(cases)]
            i += 1
            if category == "wrong key":
                status = (await client.get(f"{url}{path}", headers={"Authorization": f"Bearer guess-{i}"})).status_code
            elif isinstance(body, bytes):
                status = (await client.post(f"{url}{path}", content=body, headers={**AUTH, "content-type": "application/json"})).status_code
            elif body.get("stream"):
                status, events = await stream_chat(client, url, body)
                status = 500 if any("error" in e for e in events) else status
            else:
                status = (await client.post(f"{url}{path}", json=body, headers=AUTH)).status_code
            if i % len(cases) == 0:
                status_408 = await short_body(host, int(port))
                report.hostile[("short body", status_408)] += 1
                if status_408 != 408:
                    report.unexpected.append(f"short body: {status_408}")
            report.hostile[(category, status)] += 1
            report.server_errors += status >= 500
            if status not in allowed:
                report.unexpected.append(f"{category}: {status}")


async def disconnecting_client(url: str, stop: asyncio.Event, report: Report) -> None:
    async with httpx.AsyncClient(timeout=120) as client:
        while not stop.is_set():
            body = {"messages": [{"role": "user", "content": "leave early"}], "max_tokens": 500, "ignore_eos": True}
            await stream_chat(client, url, body, drop_after=4)
            report.disconnects += 1


async def health_poller(url: str, stop: asyncio.Event, report: Report) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        while not stop.is_set():
            started = time.perf_counter()
            response = await client.get(f"{url}/health")
            report.health_ms.append((time.perf_counter() - started) * 1000)
            report.server_errors += response.status_code >= 500
            await asyncio.sleep(0.05)


async def rss_sampler(pid: int, stop: asyncio.Event, report: Report, every: float = 2.0) -> None:
    started = time.monotonic()
    next_sample = started
    while not stop.is_set():
        rss = rss_mb(pid)
        report.rss_peak_mb = max(report.rss_peak_mb, rss)
        if time.monotonic() >= next_sample:
            report.rss_series.append((round(time.monotonic() - started, 1), round(rss, 1), round(kv_arena_rss_mb(pid, report.kv_pool_mb), 1)))
            next_sample += every
        await asyncio.sleep(0.1)


async def server_stats(url: str) -> dict:
    async with httpx.AsyncClient(timeout=30) as client:
        return (await client.get(f"{url}/get_server_info", headers=AUTH)).json()["stats"]


async def leaked_slots(url: str, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        stats = await server_stats(url)
        if stats["num_running"] == 0 and stats["num_waiting"] == 0:
            return stats["pool_size"] - stats["pool_free"] - stats["cached_tokens_in_tree"]
        if time.monotonic() > deadline:
            return -1  # never went idle: something is stuck
        await asyncio.sleep(0.1)


async def sigterm_under_load(proc: subprocess.Popen, url: str, report: Report, streams: int = 4) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        body = {"messages": [{"role": "user", "content": "still running at SIGTERM"}], "max_tokens": 2000, "ignore_eos": True}
        tasks = [asyncio.ensure_future(stream_chat(client, url, body)) for _ in range(streams)]
        while (await server_stats(url))["num_running"] < streams:
            await asyncio.sleep(0.05)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        report.streams_ended_s = time.monotonic() - started
        report.exit_code = await asyncio.to_thread(proc.wait, 60)
        report.exit_s = time.monotonic() - started
    report.sigterm_streams = streams
    for result in results:
        if isinstance(result, tuple):
            _, events = result
            error = [e for e in events if "error" in e]
            if events and events[-1].get("done") and error and error[0]["error"].get("code") == "aborted":
                report.sigterm_streams_ended += 1
            report.server_errors += sum(1 for e in error if e["error"].get("code") not in ("aborted", "shutting_down"))


async def soak(args: argparse.Namespace, model: str) -> Report:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(model, port, args.max_total_tokens)
    report = Report()
    try:
        await asyncio.to_thread(wait_healthy, proc, url, 180.0)
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(model).vocab_size
        async with httpx.AsyncClient(timeout=60) as client:  # warm-up, then the baseline
            await stream_chat(client, url, {"messages": [{"role": "user", "content": "warm"}], "max_tokens": 8})
        report.rss_baseline_mb = rss_mb(proc.pid)
        report.kv_pool_mb = (await server_stats(url)).get("kv_pool_bytes", 0) / 2**20
        stop = asyncio.Event()
        host = "127.0.0.1"
        tasks = [asyncio.ensure_future(healthy_client(i, url, stop, report, args.max_tokens)) for i in range(args.clients)]
        tasks += [
            asyncio.ensure_future(hostile_client(url, stop, report, vocab)),
            asyncio.ensure_future(disconnecting_client(url, stop, report)),
            asyncio.ensure_future(slowloris(host, port, args.slow_sockets, stop)),
            asyncio.ensure_future(health_poller(url, stop, report)),
            asyncio.ensure_future(rss_sampler(proc.pid, stop, report, args.sample_every)),
        ]
        await asyncio.sleep(args.duration)
        stop.set()
        await asyncio.gather(*tasks)
        report.leaked_slots = await leaked_slots(url)
        report.end_stats = await server_stats(url)
        report.rss_end_mb = rss_mb(proc.pid)
        report.rss_peak_mb = max(report.rss_peak_mb, rss_mb(proc.pid, "VmHWM"))
        await sigterm_under_load(proc, url, report)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return report


def print_table(args: argparse.Namespace, summary: dict) -> None:
    print(f"soak: {args.duration:g} s, {args.clients} healthy streaming clients ({args.max_tokens} tokens each), "
          f"hostile mix + disconnects + {args.slow_sockets} slow sockets, SIGTERM at the end")
    targets = {"failed": "0", "5xx": "0", "leaked_slots": "0", "rss_growth_mb": "< 200", "health_p99_ms": "< 100", "max_token_gap_ms": "< 250",
               "non_kv_growth_second_half_mb": "< 25"}
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
    print("| measure                        | value      | target |")
    print("|--------------------------------|------------|--------|")
    for key, value in summary.items():
        print(f"| {key:<30} | {str(value):>10} | {targets.get(key, ''):>6} |")


def print_series(report: Report, rows: int = 10) -> None:
    """RSS over the run, ``rows`` evenly spaced samples: a plateau shows as a flat tail."""
    series = report.rss_series
    if not series:
        return
    print("| t (s) | RSS MB | KV pool resident MB | RSS - KV MB |")
    print("|------:|-------:|--------------------:|------------:|")
    step = max(1, len(series) // rows)
    for t, rss, kv in series[::step] + ([series[-1]] if (len(series) - 1) % step else []):
        print(f"| {t:5.0f} | {rss:6.0f} | {kv:19.0f} | {rss - kv:11.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the tiny offline Llama)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of mixed load")
    parser.add_argument("--clients", type=int, default=16, help="healthy streaming clients")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per healthy request")
    parser.add_argument("--slow-sockets", type=int, default=50, help="slow-header sockets held open at a time")
    parser.add_argument("--max-total-tokens", type=int, default=16384)
    parser.add_argument("--sample-every", type=float, default=2.0, help="seconds between RSS samples (the plateau table)")
    parser.add_argument("--json", default=None, help="also write the summary (and failures) here")
    args = parser.parse_args()
    if args.model is None:
        from sglite.runtime.loading.tiny_model import build_tiny_model

        model = str(build_tiny_model("llama"))
    else:
        model = args.model
    report = asyncio.run(soak(args, model))
    summary = report.summary()
    print_table(args, summary)
    print_series(report)
    for line in (report.failures + report.unexpected)[:20]:
        print("  !", line)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({**summary, "rss_series": report.rss_series, "load_average": os.getloadavg(), "failures": report.failures, "unexpected": report.unexpected,
                       "hostile": {f"{c} -> {s}": n for (c, s), n in sorted(report.hostile.items())}}, out, indent=1)


if __name__ == "__main__":
    main()
