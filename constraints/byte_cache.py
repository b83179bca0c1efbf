"""A thread-safe LRU bounded in bytes, keyed by digests: the one cache shape of the constraint layer.

Compiled grammars, per-state logit biases and schema regexes differ in size by orders of
magnitude (a 4-byte regex, a 200 KB bias row, a 50 MB automaton), so a bound in entries bounds
nothing; each entry is charged its size and the least recently used go first. Keys are short
digests (``digest``), never the constraint text itself, so a 1 MB schema is not kept twice.

    >>> cache = ByteLRU(budget_bytes=10)
    >>> cache.put("a", "x" * 6, size=6); cache.put("b", "y" * 6, size=6)
    >>> cache.get("a") is None, cache.get("b"), cache.bytes_used
    (True, 'yyyyyy', 6)
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Generic, Hashable, TypeVar

V = TypeVar("V")


def digest(*parts: str | bytes) -> str:
    """A 128-bit hex digest of ``parts`` (unambiguous: each part is length-prefixed).

        >>> digest("ab", "c") != digest("a", "bc")
        True
    """
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        data = part.encode("utf-8", "surrogatepass") if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


class ByteLRU(Generic[V]):
    """Least-recently-used map whose entries' declared sizes sum to at most ``budget_bytes``.

    An entry larger than the whole budget is not stored (the caller still gets its value).
    """

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: Hashable, value: V, size: int) -> None:
        if size > self.budget_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (value, size)
            self._bytes += size
            while self._bytes > self.budget_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def info(self) -> dict[str, int]:
        """``{"entries", "bytes", "budget_bytes", "hits", "misses"}``."""
        return {"entries": len(self._entries), "bytes": self._bytes, "budget_bytes": self.budget_bytes,
                "hits": self.hits, "misses": self.misses}
