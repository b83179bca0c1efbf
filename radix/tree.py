"""RadixAttention prefix cache: a radix tree from token ids to the KV slots that hold them.

Page size is one token, so any shared prefix is reusable, however short (SGLang's ``RadixCache``
design; Zheng et al., "SGLang: Efficient Execution of Structured Language Model Programs", 2024).

Ownership is exact: a slot is owned by the pool (free), by the tree (cached), or by one running
request (computed but not yet inserted). ``insert`` moves a finished request's slots to the tree;
``evict`` moves least-recently-used, unlocked leaves back to the pool.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence

import torch

from sglite.radix.slot_pool import SlotAllocator


class TreeNode:
    """One edge of the radix tree: a run of tokens (``key``) and the slots holding their KV (``value``).

    ``lock_ref`` counts the running requests whose matched prefix passes through this node;
    ``last_access`` is a tick of the cache's logical clock (larger = more recently used).
    """

    _ids = itertools.count()

    def __init__(self, key: list[int], value: torch.Tensor, parent: TreeNode | None = None) -> None:
        self.key = key
        self.value = value
        self.parent = parent
        self.children: dict[int, TreeNode] = {}  # keyed by the child's first token id
        self.lock_ref = 0
        self.last_access = 0
        self.id = next(TreeNode._ids)  # breaks LRU ties deterministically

    def __len__(self) -> int:
        return len(self.key)

    def __repr__(self) -> str:
        return f"TreeNode(key={self.key}, lock_ref={self.lock_ref}, last_access={self.last_access})"


def _common_prefix_len(key: list[int], tokens: list[int], pos: int) -> int:
    """How many leading tokens of ``key`` equal ``tokens[pos:]``."""
    window = tokens[pos : pos + len(key)]  # only as many tokens as the key, not the whole tail
    if key[: len(window)] == window:  # the usual case, compared at C speed
        return len(window)
    return next(i for i, (k, t) in enumerate(zip(key, window)) if k != t)


class RadixCache:
    """Cached KV of token prefixes, shared across requests.

        >>> import torch
        >>> pool = SlotAllocator(8)
        >>> cache = RadixCache(pool)
        >>> slots = pool.alloc(3)                      # a request computed KV for tokens [1, 2, 3]
        >>> cache.insert([1, 2, 3], slots)             # the tree now owns those slots
        0
        >>> cached, node = cache.match_prefix([1, 2, 9])
        >>> torch.equal(cached, slots[:2]), cache.total_size
        (True, 3)
        >>> cache.lock(node); cache.evict(8)           # only the unlocked leaf [3] can go
        1
        >>> cache.unlock(node); cache.evict(8), pool.num_free
        (2, 8)
    """

    def __init__(self, pool: SlotAllocator, disable: bool = False) -> None:
        self.pool = pool
        self.disable = disable
        self._clock = itertools.count(1)  # logical time: LRU order must not depend on the wall clock
        self.root = TreeNode([], self._empty_slots())
        self._evictable_size = 0
        self._protected_size = 0
        self.evicted_tokens_total = 0
        """Slots ``evict`` has returned to the pool over the cache's life (a counter for stats and tests)."""
        self.version = 0
        """Bumped whenever a cached prefix may have grown or shrunk (insert, evict, reset): a prefix
        length measured at one version holds until the next."""
        # Eviction candidates, kept incrementally: every unlocked leaf has an entry with its current
        # ``last_access``; entries that went stale (touched, locked, split off, evicted) are skipped
        # when popped, so ``evict`` costs the leaves it frees, not a pass over the whole tree.
        self._lru: list[tuple[int, int, TreeNode]] = []
        self._num_nodes = 0

    # ------------------------------------------------------------------ queries

    def match_prefix(self, token_ids: Sequence[int]) -> tuple[torch.Tensor, TreeNode]:
        """Longest cached prefix of ``token_ids``: its slots (int64, one per token) and its deepest node.

        When the match ends inside a node, the node is split so the returned node covers exactly the
        match; ``lock`` it before anything can evict. Every node on the path counts as just used.
        A caller that needs logits for the last token should match ``token_ids[:-1]``.
        """
        if self.disable:
            return self._empty_slots(), self.root
        tokens = _as_list(token_ids)
        now = next(self._clock)
        node, pos, matched = self.root, 0, []
        node.last_access = now
        while pos < len(tokens) and tokens[pos] in node.children:
            child = node.children[tokens[pos]]
            shared = _common_prefix_len(child.key, tokens, pos)
            if shared < len(child):
                child = self._split(child, shared)
            child.last_access = now
            matched.append(child.value)
            node, pos = child, pos + shared
        self._push_if_candidate(node)  # its access time changed
        return (torch.cat(matched) if matched else self._empty_slots()), node

    def prefix_len(self, token_ids: Sequence[int]) -> int:
        """How many leading tokens of ``token_ids`` are cached, without splitting or touching anything.

        The read-only query for ordering a waiting queue; ``match_prefix`` is for the request admitted.
        """
        if self.disable:
            return 0
        tokens = _as_list(token_ids)
        node, pos = self.root, 0
        while pos < len(tokens) and tokens[pos] in node.children:
            node = node.children[tokens[pos]]
            shared = _common_prefix_len(node.key, tokens, pos)
            pos += shared
            if shared < len(node):
                break
        return pos

    @property
    def total_size(self) -> int:
        """Tokens (= slots) owned by the tree."""
        return self._evictable_size + self._protected_size

    @property
    def evictable_size(self) -> int:
        """Tokens in unlocked nodes (an upper bound on what ``evict`` can free now)."""
        return self._evictable_size

    # ------------------------------------------------------------------ updates

    def insert(self, token_ids: Sequence[int], slots: torch.Tensor) -> int:
        """Hand ``slots`` (KV of ``token_ids``, one each) to the tree; return how many leading tokens were cached.

        Ownership of every passed slot moves to the tree. Where the tree already caches a token under
        a different slot (a concurrent request computed the same prefix), the passed slot is freed
        back to the pool; a slot equal to the tree's (the request's own matched prefix) is kept.
        That is only sound while the request still holds the ``lock`` on its matched node.
        """
        tokens = _as_list(token_ids)
        if len(tokens) != slots.numel():
            raise ValueError(f"insert got {len(tokens)} tokens but {slots.numel()} slots; pass one slot per token")
        if self.disable:
            self.pool.free(slots)  # a disabled cache owns nothing
            return 0
        now = next(self._clock)
        node, pos = self.root, 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                leaf = TreeNode(tokens[pos:], slots[pos:].clone(), parent=node)
                leaf.last_access = now
                node.children[tokens[pos]] = leaf
                self._evictable_size += len(leaf)
                self._num_nodes += 1
                self._push_if_candidate(leaf)
                break
            shared = _common_prefix_len(child.key, tokens, pos)
            if shared < len(child):
                child = self._split(child, shared)
            incoming = slots[pos : pos + shared]
            self.pool.free(incoming[incoming != child.value])  # duplicates; the tree keeps its own copy
            child.last_access = now
            node, pos = child, pos + shared
        else:
            self._push_if_candidate(node)  # the whole key was cached already; its access time changed
        self.version += 1
        return pos

    def lock(self, node: TreeNode) -> None:
        """Protect ``node`` and its ancestors from eviction (one reference per call)."""
        while node is not self.root:
            if node.lock_ref == 0:
                self._evictable_size -= len(node)
                self._protected_size += len(node)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: TreeNode) -> None:
        """Drop one reference taken by ``lock(node)``."""
        # An ancestor's count is never below a descendant's, so checking ``node`` checks the path.
        if node is not self.root and node.lock_ref <= 0:
            raise RuntimeError(f"unlock without a matching lock on {node!r}")
        while node is not self.root:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._protected_size -= len(node)
                self._evictable_size += len(node)
                self._push_if_candidate(node)
            node = node.parent

    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` slots if possible, least recently used unlocked leaves first.

        A parent whose children are all gone becomes a leaf and a candidate in turn. Returns the
        number of slots freed (less than asked only when nothing evictable is left).
        """
        if self.disable or num_tokens <= 0:
            return 0
        freed = 0
        while self._lru and freed < num_tokens:
            access, _, node = heapq.heappop(self._lru)
            if access != node.last_access or not self._is_candidate(node):
                continue  # a stale entry: the node was touched, locked, grew children or is gone
            self.pool.free(node.value)
            parent = node.parent
            del parent.children[node.key[0]]
            node.parent = None
            self._evictable_size -= len(node)
            self._num_nodes -= 1
            freed += len(node)
            self._push_if_candidate(parent)
        if freed:
            self.evicted_tokens_total += freed
            self.version += 1
        return freed

    def reset(self) -> None:
        """Free every tree-owned slot and empty the tree. Only valid while nothing is locked."""
        if self._protected_size:
            raise RuntimeError(
                f"cannot reset the radix cache: {self._protected_size} tokens are locked by running requests; "
                "finish or abort them first"
            )
        for node in self._nodes():
            self.pool.free(node.value)
        self.root = TreeNode([], self._empty_slots())
        self._evictable_size = 0
        self._protected_size = 0
        self._lru.clear()
        self._num_nodes = 0
        self.version += 1

    # ------------------------------------------------------------------ internals

    def _is_candidate(self, node: TreeNode) -> bool:
        """An unlocked leaf still in the tree (the root never is)."""
        return node.parent is not None and not node.children and node.lock_ref == 0

    def _push_if_candidate(self, node: TreeNode) -> None:
        if not self._is_candidate(node):
            return
        heapq.heappush(self._lru, (node.last_access, node.id, node))
        if len(self._lru) > 4 * self._num_nodes + 1024:  # mostly stale entries: rebuild (amortized O(1))
            self._lru = [(n.last_access, n.id, n) for n in self._nodes() if self._is_candidate(n)]
            heapq.heapify(self._lru)

    def _split(self, child: TreeNode, at: int) -> TreeNode:
        """Cut ``child`` after ``at`` tokens; return the new upper node (same locks, same access time)."""
        upper = TreeNode(child.key[:at], child.value[:at], parent=child.parent)
        upper.lock_ref, upper.last_access = child.lock_ref, child.last_access
        upper.children = {child.key[at]: child}
        child.parent.children[child.key[0]] = upper
        child.key, child.value, child.parent = child.key[at:], child.value[at:], upper
        self._num_nodes += 1
        return upper

    def _nodes(self) -> list[TreeNode]:
        """Every node except the root."""
        out, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def _empty_slots(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.int64, device=self.pool.device)


def _as_list(token_ids: Sequence[int] | torch.Tensor) -> list[int]:
    return token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
