"""Which replica gets a request: prefix affinity with a load bound, or round-robin.

A replica's radix cache only pays when requests sharing a prefix land on it. The router keeps,
per replica, the hashes of the prompt prefixes it recently sent there (prompts cut into
``block_chars``-character blocks, each hash covering everything up to that block's end — an
approximate radix tree, as in SGLang's cache-aware router). A request goes to the replica holding
its longest such prefix, unless that replica already has ``max_imbalance`` more requests in flight
than the least loaded one; when no replica holds at least ``min_match_fraction`` of it (a shared system prompt
alone does not count) it goes to the least loaded replica.

    >>> router = PrefixAffinityRouter(2, RouterConfig(block_chars=4))
    >>> a = router.choose("shared prefix, question one")
    >>> router.done(a)
    >>> router.choose("shared prefix, question two") == a
    True
    >>> router.done(a)
    >>> rr = RoundRobinRouter(2)
    >>> [rr.choose("same prompt") for _ in range(3)]
    [0, 1, 0]
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

POLICIES = ("prefix", "round_robin")


class RouterError(ValueError):
    """A bad router setting, or no replica left to route to."""


@dataclass(frozen=True)
class RouterConfig:
    """How requests are spread over replicas."""

    policy: str = "prefix"
    """``prefix`` (longest held prefix, within the load bound) or ``round_robin``."""
    block_chars: int = 64
    """Prefix granularity in characters: prompts sharing fewer leading characters never count as sharing."""
    max_imbalance: int = 16
    """A replica holding the prefix is skipped once it has this many more requests in flight than the least loaded."""
    min_match_fraction: float = 0.3
    """A held prefix shorter than this fraction of the prompt does not attract it (a shared system prompt alone
    would otherwise pull every request to one replica); such a prompt goes to the least loaded replica."""
    max_prefixes_per_replica: int = 65536
    """Prefix hashes remembered per replica (least recently routed forgotten first), bounding router memory."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise RouterError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.block_chars < 1 or self.max_imbalance < 0 or self.max_prefixes_per_replica < 1:
            raise RouterError("block_chars and max_prefixes_per_replica must be >= 1, max_imbalance >= 0")
        if not 0.0 <= self.min_match_fraction <= 1.0:
            raise RouterError(f"min_match_fraction must be in [0, 1], got {self.min_match_fraction}")


class Router(Protocol):
    """Pick a replica for a request; told when it ends, and when a replica is gone for good."""

    def choose(self, key: str) -> int: ...

    def done(self, replica: int) -> None: ...

    def remove(self, replica: int) -> None: ...

    def restore(self, replica: int) -> None: ...


def prefix_hashes(text: str, block_chars: int) -> list[bytes]:
    """One hash per block of ``text`` (the last may be partial), each covering all of ``text`` up to that block's end.

    >>> len(prefix_hashes("abcdefghij", 4))
    3
    >>> a, b = prefix_hashes("abcdX", 4), prefix_hashes("abcdY", 4)
    >>> a[0] == b[0], a[1] == b[1]
    (True, False)
    """
    digest = hashlib.blake2b(digest_size=16)
    hashes = []
    for start in range(0, len(text), block_chars):
        digest.update(text[start : start + block_chars].encode("utf-8", "surrogatepass"))
        hashes.append(digest.copy().digest())
    return hashes


class _Balancer:
    """In-flight counts of live replicas (shared by both policies)."""

    def __init__(self, num_replicas: int) -> None:
        if num_replicas < 1:
            raise RouterError(f"need at least one replica, got {num_replicas}")
        self.in_flight = [0] * num_replicas
        self.routed = [0] * num_replicas
        self.live = set(range(num_replicas))

    def least_loaded(self) -> int:
        """Fewest in flight; ties go to the replica routed to least so far (spreads a sequential caller too)."""
        if not self.live:
            raise RouterError("every replica has failed; nothing left to route to")
        return min(self.live, key=lambda r: (self.in_flight[r], self.routed[r], r))

    def _take(self, replica: int) -> int:
        self.in_flight[replica] += 1
        self.routed[replica] += 1
        return replica

    def done(self, replica: int) -> None:
        self.in_flight[replica] = max(0, self.in_flight[replica] - 1)

    def remove(self, replica: int) -> None:
        self.live.discard(replica)

    def restore(self, replica: int) -> None:
        """Route to ``replica`` again (it was restarted; its cache starts empty)."""
        self.live.add(replica)


class RoundRobinRouter(_Balancer):
    """Replicas in turn, ignoring prompts (the baseline prefix affinity is measured against)."""

    def __init__(self, num_replicas: int, config: RouterConfig | None = None) -> None:
        super().__init__(num_replicas)
        self._next = 0

    def choose(self, key: str) -> int:
        if not self.live:
            raise RouterError("every replica has failed; nothing left to route to")
        n = len(self.in_flight)
        while self._next % n not in self.live:
            self._next += 1
        replica = self._next % n
        self._next += 1
        return self._take(replica)


class PrefixAffinityRouter(_Balancer):
    """The replica holding the longest prefix of the prompt, within a load bound."""

    def __init__(self, num_replicas: int, config: RouterConfig | None = None) -> None:
        super().__init__(num_replicas)
        self.config = config or RouterConfig()
        self.held: list[OrderedDict[bytes, None]] = [OrderedDict() for _ in range(num_replicas)]

    def matched_blocks(self, replica: int, hashes: list[bytes]) -> int:
        held = self.held[replica]
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n

    def choose(self, key: str) -> int:
        hashes = prefix_hashes(key, self.config.block_chars)
        fallback = self.least_loaded()
        bound = self.in_flight[fallback] + self.config.max_imbalance
        # Below this many matched blocks a held prefix is too small a share of the prompt to pay for imbalance.
        best, best_len = fallback, max(0, math.ceil(self.config.min_match_fraction * len(hashes)) - 1)
        for replica in sorted(self.live):
            matched = self.matched_blocks(replica, hashes)
            if matched > best_len and self.in_flight[replica] <= bound:
                best, best_len = replica, matched
        self._remember(best, hashes)
        return self._take(best)

    def _remember(self, replica: int, hashes: list[bytes]) -> None:
        held = self.held[replica]
        for h in hashes:
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.config.max_prefixes_per_replica:
            held.popitem(last=False)

    def remove(self, replica: int) -> None:
        super().remove(replica)
        self.held[replica].clear()


def make_router(num_replicas: int, config: RouterConfig | None = None) -> Router:
    """The router ``config.policy`` names."""
    config = config or RouterConfig()
    cls = PrefixAffinityRouter if config.policy == "prefix" else RoundRobinRouter
    return cls(num_replicas, config)
