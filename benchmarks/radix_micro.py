"""Micro-benchmark of the cache's hot paths at 10^5 cached tokens: each operation next to the code it replaced.

    python benchmarks/radix_micro.py [--tokens 100000] [--repeat 7] [--quick]

Rows (the "before" column runs the previous implementation, kept below as the baseline):
  free     give back 4 slots, 1,000 times, with the rest of the pool free (was: concatenate the whole free list per call)
  evict    free 16 tokens, 200 times, from a tree of ~10^5 tokens (was: build a heap over every node per call)
  order    rank 128 waiting requests by cached prefix: one step, and 20 steps with the tree unchanged (was: ``match_prefix``,
           which splits nodes, concatenates slot tensors and touches the LRU clock, for each request each step,
           on a copy of prompt + output)
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, min_median, timed  # noqa: E402

from sglite.radix.slot_pool import SlotAllocator  # noqa: E402
from sglite.radix.tree import RadixCache  # noqa: E402


class OldSlotAllocator(SlotAllocator):
    """The previous ``free``: one ``torch.cat`` of the whole free list per call."""

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel():
            self._free = torch.cat([self._free, *self._returned, slots])
            self._returned.clear()
            self._num_free += int(slots.numel())


def old_evict(cache: RadixCache, num_tokens: int) -> int:
    """The previous ``evict``: a heap over every unlocked leaf of the tree, rebuilt per call."""
    heap = [(n.last_access, n.id, n) for n in cache._nodes() if not n.children and n.lock_ref == 0]
    heapq.heapify(heap)
    freed = 0
    while heap and freed < num_tokens:
        _, _, node = heapq.heappop(heap)
        cache.pool.free(node.value)
        parent = node.parent
        del parent.children[node.key[0]]
        node.parent = None
        cache._evictable_size -= len(node)
        freed += len(node)
        if parent is not cache.root and not parent.children and parent.lock_ref == 0:
            heapq.heappush(heap, (parent.last_access, parent.id, parent))
    return freed


def build_tree(tokens: int, seed: int = 0) -> tuple[RadixCache, list[list[int]]]:
    """~``tokens`` cached tokens: 64 shared stems of 64 tokens, each continued by many 32-token tails."""
    rng = random.Random(seed)
    pool = SlotAllocator(2 * tokens + 4096)
    cache = RadixCache(pool)
    stems = [[rng.randrange(50_000) for _ in range(64)] for _ in range(64)]
    sequences = []
    while cache.total_size < tokens:
        seq = rng.choice(stems) + [rng.randrange(50_000) for _ in range(32)]
        cache.insert(seq, pool.alloc(len(seq)))
        sequences.append(seq)
    return cache, sequences


def bench_free(size: int, repeat: int) -> tuple[list[float], list[float]]:
    def run(kind: type[SlotAllocator]) -> float:
        pool = kind(size)
        taken = [pool.alloc(4) for _ in range(1000)]

        def give_back() -> None:
            for slots in taken:
                pool.free(slots)

        return timed(give_back, 1)[0][0]

    return [run(OldSlotAllocator) for _ in range(repeat)], [run(SlotAllocator) for _ in range(repeat)]


def bench_evict(tokens: int, repeat: int) -> tuple[list[float], list[float]]:
    def run(evict) -> float:
        cache, _ = build_tree(tokens)
        return timed(lambda: [evict(cache, 16) for _ in range(200)], 1)[0][0]

    return [run(old_evict) for _ in range(repeat)], [run(RadixCache.evict) for _ in range(repeat)]


def bench_order(tokens: int, repeat: int, steps_per_run: int) -> tuple[list[float], list[float]]:
    rng = random.Random(1)

    def waiting(sequences: list[list[int]]) -> list[tuple[list[int], list[int]]]:
        # 128 requests whose prompts extend cached sequences (~1,000 prompt tokens), 16 output tokens each
        out = []
        for _ in range(128):
            prompt = rng.choice(sequences) + [rng.randrange(50_000) for _ in range(900)]
            out.append((prompt, [rng.randrange(50_000) for _ in range(16)]))
        return out

    def run_old() -> float:
        cache, sequences = build_tree(tokens)
        reqs = waiting(sequences)

        def steps() -> None:
            for _ in range(steps_per_run):
                sorted(reqs, key=lambda r: -len(cache.match_prefix((r[0] + r[1])[: len(r[0]) + len(r[1]) - 1])[0]))

        return timed(steps, 1)[0][0]

    def run_new() -> float:
        from sglite.runtime.request import Request
        from sglite.runtime.scheduler import Scheduler

        cache, sequences = build_tree(tokens)
        reqs = []
        for i, (prompt, output) in enumerate(waiting(sequences)):
            req = Request.__new__(Request)  # only the fields the ranking reads
            req.rid, req.prompt_ids, req.output_ids, req.logprob_start_len = str(i), prompt, output, -1
            reqs.append(req)
        sched = Scheduler.__new__(Scheduler)
        sched.tree, sched._prefix_memo = cache, {}

        def steps() -> None:
            for _ in range(steps_per_run):
                sorted(reqs, key=lambda r: -sched._cached_prefix_len(r))

        return timed(steps, 1)[0][0]

    return [run_old() for _ in range(repeat)], [run_new() for _ in range(repeat)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=100_000, help="cached tokens in the tree / free slots in the pool")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="10^4 tokens, 3 repetitions (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.repeat = 10_000, 3
    torch.set_num_threads(1)  # bookkeeping, not math: one thread for both columns
    print(header(f"radix_micro: cache hot paths at {args.tokens:,} cached tokens", "cpu", "int64 slot ids", args.repeat))
    print("| operation                              | before ms             | now ms             | speed-up (median) |")
    print("|----------------------------------------|-----------------------|--------------------|-------------------|")
    rows = [
        ("free: 1,000 x 4 slots", bench_free(args.tokens, args.repeat)),
        ("evict: 200 x 16 tokens", bench_evict(args.tokens, args.repeat)),
        ("order 128 waiting: 1 step, tree changed", bench_order(args.tokens, args.repeat, 1)),
        ("order 128 waiting: 20 steps, unchanged", bench_order(args.tokens, args.repeat, 20)),
    ]
    import statistics

    for name, (before, now) in rows:
        ratio = statistics.median(before) / statistics.median(now)
        print(f"| {name:<38} | {min_median(before, 1e3):>21} | {min_median(now, 1e3):>18} | {ratio:>16.1f}x |")


if __name__ == "__main__":
    main()
