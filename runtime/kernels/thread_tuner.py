"""Picks the CPU thread count of each forward by timing the candidates on the live workload.

Which count is fastest depends on the model, the forward's size and the machine's load: on a small
model one thread beats two for decode, a 512-token prefill on an idle machine wants every core, and
on a shared machine a second thread that gets descheduled stalls every parallel region. No fixed rule covers all three, so the runner times
the candidates per forward-size bucket, keeps the fastest, and retries the others now and then.

    >>> tuner = ThreadTuner(candidates=(1, 2), trials=2, recheck_every=100)
    >>> for seconds_1, seconds_2 in [(0.010, 0.030), (0.011, 0.025)]:
    ...     tuner.record(1, tuner.choose(1), seconds_1)
    ...     tuner.record(1, tuner.choose(1), seconds_2)
    >>> tuner.choose(1)
    1
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field


@dataclass
class ThreadTuner:
    """Per forward-size bucket (tokens rounded up to a power of two), the thread count with the
    lowest median of its last ``trials`` timings."""

    candidates: tuple[int, ...]
    """Thread counts to try, e.g. ``(1, torch.get_num_threads())``."""
    trials: int = 3
    """Timed forwards kept per candidate and bucket; each candidate gets this many before a choice."""
    recheck_every: int = 200
    """After the choice, one forward in this many runs on the least recently timed other candidate,
    so the choice follows changes in load."""
    _timings: dict[int, dict[int, deque[float]]] = field(default_factory=dict, repr=False)
    _forwards: dict[int, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.candidates or any(c < 1 for c in self.candidates):
            raise ValueError(f"thread candidates must be positive integers, got {self.candidates!r}")
        self.candidates = tuple(dict.fromkeys(self.candidates))

    @staticmethod
    def bucket(num_tokens: int) -> int:
        return max(num_tokens - 1, 0).bit_length()

    def _bucket_timings(self, num_tokens: int) -> dict[int, deque[float]]:
        return self._timings.setdefault(
            self.bucket(num_tokens), {c: deque(maxlen=self.trials) for c in self.candidates}
        )

    def choose(self, num_tokens: int) -> int:
        """The thread count for the next forward over ``num_tokens`` new tokens."""
        timings = self._bucket_timings(num_tokens)
        untried = [c for c in self.candidates if len(timings[c]) < self.trials]
        if untried:
            return min(untried, key=lambda c: len(timings[c]))
        best = min(self.candidates, key=lambda c: statistics.median(timings[c]))
        count = self._forwards.get(self.bucket(num_tokens), 0)
        if len(self.candidates) > 1 and count % self.recheck_every == self.recheck_every - 1:
            others = [c for c in self.candidates if c != best]
            return others[(count // self.recheck_every) % len(others)]
        return best

    def record(self, num_tokens: int, threads: int, seconds: float) -> None:
        """Note that a forward over ``num_tokens`` tokens took ``seconds`` on ``threads`` threads."""
        if threads in self.candidates:
            self._bucket_timings(num_tokens)[threads].append(seconds)
        key = self.bucket(num_tokens)
        self._forwards[key] = self._forwards.get(key, 0) + 1

    def chosen(self) -> dict[int, int]:
        """``{bucket upper bound in tokens: thread count}`` for every bucket whose trials are complete."""
        out = {}
        for key, timings in self._timings.items():
            if all(len(t) == self.trials for t in timings.values()):
                out[1 << key] = min(self.candidates, key=lambda c: statistics.median(timings[c]))
        return out
