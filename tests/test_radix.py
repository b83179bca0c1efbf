"""The radix prefix cache: unit behaviour plus a stateful property test of slot ownership."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, multiple, rule

from sglite.radix import RadixCache, TreeNode
from sglite.runtime.kv_pool import KVSlotPool


def make_cache(size: int = 32, disable: bool = False) -> tuple[KVSlotPool, RadixCache]:
    pool = KVSlotPool(size, num_layers=1, num_kv_heads=1, head_dim=1)
    return pool, RadixCache(pool, disable=disable)


def cache_request(pool: KVSlotPool, cache: RadixCache, tokens: list[int]) -> torch.Tensor:
    """What the engine does for a request with no match: compute every token, then insert."""
    slots = pool.alloc(len(tokens))
    cache.insert(tokens, slots)
    return slots


def test_match_on_empty_tree_returns_root():
    pool, cache = make_cache()
    slots, node = cache.match_prefix([1, 2, 3])
    assert slots.dtype == torch.int64 and slots.numel() == 0
    assert node is cache.root


def test_partial_match_splits_node_to_cover_exactly_the_match():
    pool, cache = make_cache()
    slots = cache_request(pool, cache, [1, 2, 3, 4])
    matched, node = cache.match_prefix([1, 2, 9])
    assert torch.equal(matched, slots[:2])
    assert node.key == [1, 2] and torch.equal(node.value, slots[:2])
    (child,) = node.children.values()
    assert child.key == [3, 4] and child.parent is node
    # The split loses nothing: the whole sequence still matches, across both halves.
    full, leaf = cache.match_prefix([1, 2, 3, 4, 5])
    assert torch.equal(full, slots) and leaf is child
    assert cache.total_size == 4


def test_insert_returns_cached_prefix_length_and_adds_suffix():
    pool, cache = make_cache()
    cache_request(pool, cache, [1, 2, 3])
    prefix, node = cache.match_prefix([1, 2, 3, 7, 8])
    cache.lock(node)
    new = pool.alloc(2)
    assert cache.insert([1, 2, 3, 7, 8], torch.cat([prefix, new])) == 3
    cache.unlock(node)
    assert cache.total_size == 5 and pool.num_free == 32 - 5
    assert torch.equal(cache.match_prefix([1, 2, 3, 7, 8])[0], torch.cat([prefix, new]))


def test_insert_frees_duplicate_slots_and_keeps_identical_ones():
    pool, cache = make_cache()
    first = cache_request(pool, cache, [5, 6, 7])
    # A second request matched [5] and then computed [6, 7, 8] concurrently with the first.
    prefix, node = cache.match_prefix([5])
    cache.lock(node)
    own = pool.alloc(3)
    free_before = pool.num_free
    assert cache.insert([5, 6, 7, 8], torch.cat([prefix, own])) == 3
    cache.unlock(node)
    # Its slots for 6 and 7 duplicate the tree's and go back; its slot for 8 is now cached.
    assert pool.num_free == free_before + 2
    matched, _ = cache.match_prefix([5, 6, 7, 8])
    assert torch.equal(matched, torch.cat([first, own[2:]]))
    assert cache.total_size == 4 and pool.num_free + cache.total_size == pool.size


def test_lock_protects_from_eviction_and_sizes_follow():
    pool, cache = make_cache()
    cache_request(pool, cache, [1, 2, 3, 4])
    cache_request(pool, cache, [1, 2, 8])
    _, node = cache.match_prefix([1, 2, 3, 4])
    cache.lock(node)
    assert (cache.evictable_size, cache.total_size) == (1, 5)  # 4 locked
    assert cache.evict(100) == 1  # only the unlocked leaf [8]
    assert cache.match_prefix([1, 2, 3, 4])[0].numel() == 4
    cache.unlock(node)
    assert (locked_size(cache), cache.evictable_size) == (0, 4)
    assert cache.evict(100) == 4 and pool.num_free == pool.size


def locked_size(cache: RadixCache) -> int:
    """Tokens in nodes locked by running requests."""
    return cache.total_size - cache.evictable_size


def test_splitting_a_locked_node_keeps_both_halves_locked():
    pool, cache = make_cache()
    cache_request(pool, cache, [0, 1, 2])
    _, whole = cache.match_prefix([0, 1, 2])
    cache.lock(whole)
    _, upper = cache.match_prefix([0, 1, 7])  # splits the locked node
    assert upper.lock_ref == whole.lock_ref == 1 and locked_size(cache) == 3
    cache.lock(upper)
    assert locked_size(cache) == 3
    cache.unlock(whole)
    assert (locked_size(cache), cache.evictable_size) == (2, 1)
    cache.unlock(upper)
    assert (locked_size(cache), cache.evictable_size) == (0, 3)


def test_unlock_without_lock_raises():
    pool, cache = make_cache()
    cache_request(pool, cache, [1, 2])
    _, node = cache.match_prefix([1, 2])
    with pytest.raises(RuntimeError, match="unlock"):
        cache.unlock(node)


def test_evict_least_recently_used_first_then_parent_becomes_leaf():
    pool, cache = make_cache()
    cache_request(pool, cache, [1, 1])
    cache_request(pool, cache, [2, 2])
    cache_request(pool, cache, [3, 3])
    cache.match_prefix([1, 1])  # [1, 1] is now the most recently used
    assert cache.evict(1) == 2  # whole leaves go: [2, 2], the oldest
    assert cache.match_prefix([2, 2])[0].numel() == 0
    assert cache.match_prefix([1, 1])[0].numel() == 2
    assert cache.evict(1) == 2  # now [3, 3] is the oldest
    assert cache.match_prefix([3, 3])[0].numel() == 0
    # Evicting a leaf exposes its parent, which is evicted in the same call if more is needed.
    cache_request(pool, cache, [4, 5, 6])
    cache.match_prefix([4, 5])  # split into [4, 5] -> [6]
    cache.match_prefix([1, 1])
    assert cache.evict(3) == 3 and cache.match_prefix([1, 1])[0].numel() == 2
    assert cache.total_size == 2


def test_reset_frees_everything_unless_locked():
    pool, cache = make_cache()
    cache_request(pool, cache, [1, 2, 3])
    _, node = cache.match_prefix([1])
    cache.lock(node)
    with pytest.raises(RuntimeError, match="locked"):
        cache.reset()
    cache.unlock(node)
    cache.reset()
    assert cache.total_size == 0 and pool.num_free == pool.size
    assert cache.match_prefix([1, 2, 3])[0].numel() == 0


def test_disabled_cache_matches_nothing_and_frees_every_inserted_slot():
    pool, cache = make_cache(disable=True)
    slots = pool.alloc(3)
    assert cache.insert([1, 2, 3], slots) == 0
    assert pool.num_free == pool.size and cache.total_size == 0
    matched, node = cache.match_prefix([1, 2, 3])
    assert matched.numel() == 0 and node is cache.root
    cache.lock(node)
    cache.unlock(node)
    assert cache.evict(10) == 0


def test_insert_rejects_mismatched_lengths():
    pool, cache = make_cache()
    with pytest.raises(ValueError, match="one slot per token"):
        cache.insert([1, 2], pool.alloc(3))


def test_accepts_tensor_token_ids():
    pool, cache = make_cache()
    slots = cache_request(pool, cache, [4, 5, 6])
    matched, _ = cache.match_prefix(torch.tensor([4, 5, 6, 7]))
    assert torch.equal(matched, slots)


# --------------------------------------------------------------------------- stateful property test

POOL_SIZE = 64
ALPHABET = st.integers(0, 2)  # three token ids, so prefixes collide and nodes split often
TOKENS = st.lists(ALPHABET, min_size=1, max_size=8)


class Request:
    def __init__(self, tokens: list[int], prefix: torch.Tensor, own: torch.Tensor, node: TreeNode) -> None:
        self.tokens = tokens
        self.prefix = prefix  # slots shared with the tree (locked through ``node``)
        self.own = own  # slots this request allocated and still owns
        self.node = node

    @property
    def slots(self) -> torch.Tensor:
        return torch.cat([self.prefix, self.own])


class RadixCacheMachine(RuleBasedStateMachine):
    """Requests start (match + lock + alloc), decode, finish (insert + unlock) or abort; the tree evicts.

    The model records, for every slot a request wrote, the token sequence whose last token it holds
    (KV depends on the whole prefix), so a match is correct only if slot i holds exactly tokens[:i+1].
    """

    requests = Bundle("requests")

    def __init__(self) -> None:
        super().__init__()
        self.pool = KVSlotPool(POOL_SIZE, num_layers=1, num_kv_heads=1, head_dim=1)
        self.cache = RadixCache(self.pool)
        self.written: dict[int, tuple[int, ...]] = {}
        self.running: list[Request] = []

    def _alloc(self, n: int) -> torch.Tensor | None:
        slots = self.pool.alloc(n)
        if slots is None:
            self.cache.evict(n - self.pool.num_free)
            slots = self.pool.alloc(n)
        return slots

    def _check_match(self, tokens: list[int], slots: torch.Tensor) -> None:
        for i, slot in enumerate(slots.tolist()):
            assert self.written[slot] == tuple(tokens[: i + 1]), "match_prefix returned a slot with other KV"

    @rule(target=requests, tokens=TOKENS)
    def start_request(self, tokens):
        prefix, node = self.cache.match_prefix(tokens)
        self._check_match(tokens, prefix)
        self.cache.lock(node)
        own = self._alloc(len(tokens) - prefix.numel())
        if own is None:  # not enough memory even after eviction: the scheduler keeps it waiting
            self.cache.unlock(node)
            return multiple()
        for i, slot in enumerate(own.tolist(), start=prefix.numel()):
            self.written[slot] = tuple(tokens[: i + 1])
        request = Request(tokens, prefix, own, node)
        self.running.append(request)
        return request

    @rule(request=requests, token=ALPHABET)
    def decode(self, request, token):
        if request not in self.running:
            return
        slot = self._alloc(1)
        if slot is None:
            return
        request.tokens = request.tokens + [token]
        request.own = torch.cat([request.own, slot])
        self.written[int(slot)] = tuple(request.tokens)

    @rule(request=consumes(requests))
    def finish(self, request):
        if request not in self.running:
            return
        self.running.remove(request)
        cached = self.cache.insert(request.tokens, request.slots)
        assert cached >= request.prefix.numel()
        self.cache.unlock(request.node)

    @rule(request=consumes(requests))
    def abort(self, request):
        if request not in self.running:
            return
        self.running.remove(request)
        self.pool.free(request.own)
        self.cache.unlock(request.node)

    @rule(num_tokens=st.integers(0, POOL_SIZE))
    def evict(self, num_tokens):
        evictable = self.cache.evictable_size
        leaves = sorted((n.last_access, n.id, n) for n in self.cache._nodes() if not n.children and n.lock_ref == 0)
        freed = self.cache.evict(num_tokens)
        assert freed >= num_tokens or self.cache.evictable_size == 0
        assert freed <= evictable
        if num_tokens and leaves:  # the least recently used unlocked leaf goes first
            assert leaves[0][2].parent is None

    @rule(tokens=TOKENS)
    def measure(self, tokens):
        # The read-only query agrees with match_prefix, and changes nothing.
        version, size = self.cache.version, self.cache.total_size
        assert self.cache.prefix_len(tokens) == self.cache.match_prefix(tokens)[0].numel()
        assert (self.cache.version, self.cache.total_size) == (version, size)

    @rule(tokens=TOKENS)
    def lookup(self, tokens):
        self._check_match(tokens, self.cache.match_prefix(tokens)[0])

    @invariant()
    def slots_are_conserved(self):
        owned_by_requests = sum(r.own.numel() for r in self.running)
        assert self.pool.num_free + self.cache.total_size + owned_by_requests == POOL_SIZE

    @invariant()
    def every_unlocked_leaf_is_an_eviction_candidate(self):
        # The incremental LRU heap (no pass over the tree per evict) must hold a fresh entry for each.
        fresh = {id(n) for access, _, n in self.cache._lru if access == n.last_access}
        assert all(id(n) in fresh for n in self.cache._nodes() if not n.children and n.lock_ref == 0)

    @invariant()
    def no_slot_owned_twice(self):
        tree_slots, stack = [], list(self.cache.root.children.values())
        while stack:
            node = stack.pop()
            assert len(node.key) == node.value.numel() > 0
            tree_slots += node.value.tolist()
            stack.extend(node.children.values())
        free = self.pool.alloc(self.pool.num_free)  # borrow the free list to look at it
        self.pool.free(free)
        assert len(tree_slots) == self.cache.total_size
        owners = tree_slots + free.tolist() + [s for r in self.running for s in r.own.tolist()]
        assert sorted(owners) == list(range(POOL_SIZE))

    @invariant()
    def exactly_the_running_prefixes_are_locked(self):
        # The tree is a trie, so locked tokens = distinct prefixes matched by running requests.
        locked = {tuple(r.tokens[:i]) for r in self.running for i in range(1, r.prefix.numel() + 1)}
        assert locked_size(self.cache) == len(locked)

    def teardown(self):
        for request in list(self.running):
            self.finish(request)
        assert locked_size(self.cache) == 0
        self.cache.evict(POOL_SIZE)
        assert self.cache.total_size == 0 and self.pool.num_free == POOL_SIZE


RadixCacheMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    database=None,  # no example files in the working tree; the seed search is cheap enough
    suppress_health_check=[HealthCheck.too_slow],
)
test_radix_cache_state_machine = RadixCacheMachine.TestCase
