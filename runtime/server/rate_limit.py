"""Per-client request rate limiting: one token bucket per API key (or client address)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable


class RateLimiter:
    """Allow ``requests_per_minute`` per key on average, with bursts of up to that many.

    A token bucket per key refills continuously, so a client that waits gets capacity back
    gradually rather than all at once at a minute boundary.

        >>> limiter = RateLimiter(requests_per_minute=2, clock=lambda: 0.0)  # a frozen clock
        >>> [limiter.acquire("key") for _ in range(3)]
        [0.0, 0.0, 30.0]
    """

    def __init__(self, requests_per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        if requests_per_minute < 1:
            raise ValueError(f"requests_per_minute must be at least 1, got {requests_per_minute}")
        self.capacity = float(requests_per_minute)
        self.refill_per_second = requests_per_minute / 60.0
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last update time)
        self._lock = threading.Lock()

    @property
    def tracked_keys(self) -> int:
        """Keys whose bucket is held; past 10,000, the full buckets are forgotten (a full one is the default)."""
        return len(self._buckets)

    def acquire(self, key: str) -> float:
        """Take one request's token: 0.0 when allowed, else the seconds to wait before retrying."""
        with self._lock:
            now = self._clock()
            tokens, last = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.refill_per_second)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                if len(self._buckets) > 10_000:
                    self._forget_full_buckets(now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.refill_per_second

    def _forget_full_buckets(self, now: float) -> None:
        # A bucket that has refilled completely is indistinguishable from a new one: drop it,
        # so a stream of one-off client addresses cannot grow the table without bound.
        full = [k for k, (tokens, last) in self._buckets.items() if tokens + (now - last) * self.refill_per_second >= self.capacity]
        for key in full:
            del self._buckets[key]


def retry_after_header(wait_seconds: float) -> dict[str, str]:
    """``Retry-After`` in whole seconds (rounded up), as HTTP and the openai SDK expect."""
    return {"Retry-After": str(max(1, math.ceil(wait_seconds)))}
