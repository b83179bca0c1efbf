"""Continuous batching over a radix-cached KV pool.

Every step the scheduler admits waiting requests (longest cached prefix first), gives each running
request its next tokens — a prefill chunk under a token budget, one decode token, or a decode token
plus text forced by a constraint — runs ONE forward over that ragged batch, samples, and retires
finished requests into the radix tree so later requests reuse their KV.

Slot ownership (checked by ``check_invariant``): a slot is free in the pool, owned by the radix tree,
or owned by exactly one running request (``slot_indices[tree_len:]``). A decoding request may hold a few
slots past its computed tokens (``slot_indices[kv_len:]``): a run taken ahead of its next decode steps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from sglite.runtime.kv_pool import KVSlotPool
from sglite.radix.tree import RadixCache
from sglite.runtime.config import EngineConfig
from sglite.runtime.detokenizer import match_stop
from sglite.runtime.forward_batch import ForwardBatch
from sglite.runtime.request import Request, RequestStatus
from sglite.runtime.sampler import token_logprobs, top_logprobs
from sglite.runtime.token_selection import select_tokens, take_rows

logger = logging.getLogger(__name__)

DECODE_HEADROOM = 8
"""Free slots kept per running request at admission, so decoding rarely needs to preempt."""
IN_BATCH_PREFIX_MIN = 32
"""A waiting request that shares this many uncached tokens with one being prefilled waits for it."""
DECODE_SLOT_RUN = 64
"""Slots a decoding request takes at once (while the pool can spare them) and fills over its next steps.
Taken one a step, the slots of a batch's sequences interleave in the pool (each step hands out one per
sequence), and attention reads every sequence's keys ``batch`` rows apart; in runs of 64 they sit together,
which the decode-attention kernel reads faster with cold caches (``benchmarks/decode_attention.py``)."""
LPM_QUEUE_LIMIT = 128
"""Longest-prefix ordering costs a tree walk per waiting request; past this many, use arrival order."""


def _share_prefix(a: list[int], b: list[int], n: int) -> bool:
    """Whether ``a`` and ``b`` agree on their first ``n`` tokens (a C-speed slice compare, not a loop)."""
    return len(a) >= n and len(b) >= n and a[:n] == b[:n]


class Scheduler:
    """Owns the waiting queue and the running batch; driven by the engine's step loop only."""

    def __init__(
        self,
        forward: Callable[[ForwardBatch, torch.Tensor], torch.Tensor],
        pool: KVSlotPool,
        tree: RadixCache,
        config: EngineConfig,
        eos_token_ids: set[int],
        context_length: int,
    ) -> None:
        self.forward = forward
        self.pool = pool
        self.tree = tree
        self.config = config
        self.eos_token_ids = eos_token_ids
        self.context_length = context_length
        self.waiting: list[Request] = []
        self._prefix_memo: dict[str, tuple[int, int, int]] = {}  # rid -> (tree version, limit, cached tokens)
        self.running: list[Request] = []
        self.stats = {
            "forward_calls": 0,
            "prefill_tokens_computed": 0,
            "cache_hit_tokens_total": 0,
            "prompt_tokens_total": 0,
            "generation_tokens_total": 0,
            "requests_total": 0,
            "preemptions": 0,
            "requests_failed": 0,
            "isolation_retries": 0,
        }

    # ---- queue management -------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.waiting.append(req)
        self.stats["requests_total"] += 1
        self.stats["prompt_tokens_total"] += len(req.prompt_ids)

    def abort(self, rid: str) -> None:
        for req in self.waiting:
            if req.rid == rid:
                self.waiting.remove(req)
                self._finish(req, "abort", None)
                return
        for req in self.running:
            if req.rid == rid:
                self._finish(req, "abort", None)
                return

    def abort_request(self, req: Request, error: BaseException | None = None) -> None:
        """End exactly ``req`` (identity, not id), optionally with ``error``; a finished one is left alone."""
        if req.finished:
            return
        req.error = error
        if req in self.waiting:
            self.waiting.remove(req)
        self._finish(req, "abort", None)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def fail_all(self, error: BaseException) -> None:
        """A step raised: end every request with the error instead of leaving callers waiting."""
        for req in list(self.running) + list(self.waiting):
            req.error = error
            if req in self.waiting:
                self.waiting.remove(req)
            self._finish(req, "abort", None)

    def check_invariant(self) -> None:
        owned = sum(req.slot_indices.numel() - req.tree_len for req in self.running)
        total = self.pool.num_free + self.tree.total_size + owned
        if total != self.pool.size:
            raise AssertionError(
                f"KV slot leak: free {self.pool.num_free} + tree {self.tree.total_size} + requests {owned} "
                f"!= pool {self.pool.size}"
            )

    # ---- one step ---------------------------------------------------------------------
    def step(self) -> None:
        self._admit()
        segments = self._build_segments()
        if not segments:
            return
        self._run_batch(segments)

    def _prefix_limit(self, req: Request) -> int:
        """Most tokens that may come from the cache: the last token is always computed (its logits
        are sampled), and prompt logprobs need logits from ``logprob_start_len`` on (the token at
        ``logprob_start_len`` itself is reported without a logprob, as SGLang does)."""
        limit = req.fill_len - 1
        if req.logprob_start_len >= 0:
            limit = min(limit, req.logprob_start_len)
        return limit

    def _admit(self) -> None:
        if not self.waiting:
            return
        if self.config.schedule_policy == "lpm" and len(self.waiting) <= LPM_QUEUE_LIMIT:
            # stable sort: equal prefixes keep arrival order
            self.waiting.sort(key=lambda r: -self._cached_prefix_len(r))
        prefilling = [r for r in self.running if r.kv_len < len(r.prompt_ids)]
        for req in list(self.waiting):
            if len(self.running) >= self.config.max_running_requests:
                break
            leader = req.prompt_leader
            if leader is not None and not self.tree.disable and not leader.finished and leader.kv_len < len(leader.prompt_ids):
                continue  # a parallel sample: decode from the leader's cached prompt once it is prefilled
            cached = self._cached_prefix_len(req)
            if not self.tree.disable:
                head = req.fill_slice(0, cached + IN_BATCH_PREFIX_MIN)
                if any(_share_prefix(head, other.prompt_ids, cached + IN_BATCH_PREFIX_MIN) for other in prefilling):
                    continue  # its prefix is being computed right now; reuse it next step
            # Only a request about to be admitted walks the tree with match_prefix (which splits and touches).
            slots, node = self.tree.match_prefix(req.fill_slice(0, self._prefix_limit(req)))
            self.tree.lock(node)
            needed = req.fill_len - len(slots) + DECODE_HEADROOM * (len(self.running) + 1)
            short = self.pool.num_free + self.tree.evictable_size < needed
            if short and self.running and self._return_spares():
                short = self.pool.num_free + self.tree.evictable_size < needed
            if short and self.running:
                self.tree.unlock(node)
                break  # hold back until running requests free memory
            self.waiting.remove(req)
            self._prefix_memo.pop(req.rid, None)
            req.status = RequestStatus.RUNNING
            req.tree_node, req.tree_len, req.kv_len = node, len(slots), len(slots)
            req.slot_indices = slots
            if req.cached_tokens == 0:
                req.cached_tokens = len(slots)
                self.stats["cache_hit_tokens_total"] += len(slots)
            self.running.append(req)
            prefilling.append(req)

    def _return_spares(self) -> int:
        """Give back the slots decoding requests took ahead (:data:`DECODE_SLOT_RUN`), before a waiting
        request is held back for memory; how many. Between steps no request holds a slot past its
        computed tokens for any other reason."""
        freed = 0
        for r in self.running:
            spare = r.slot_indices.numel() - r.kv_len
            if spare > 0:
                self.pool.free(r.slot_indices[r.kv_len :])
                r.slot_indices = r.slot_indices[: r.kv_len]
                freed += spare
        return freed

    def _cached_prefix_len(self, req: Request) -> int:
        """Tokens of a waiting request the tree could serve; re-measured only after the tree changed.

        A read-only walk (``RadixCache.prefix_len``): ordering the queue splits and touches nothing.
        """
        limit = self._prefix_limit(req)
        memo = self._prefix_memo.get(req.rid)
        if memo is None or memo[:2] != (self.tree.version, limit):
            memo = (self.tree.version, limit, self.tree.prefix_len(req.fill_slice(0, limit)))
            self._prefix_memo[req.rid] = memo
        return memo[2]

    def _alloc(self, n: int) -> torch.Tensor | None:
        slots = self.pool.alloc(n)
        if slots is None:
            self.tree.evict(n - self.pool.num_free)
            slots = self.pool.alloc(n)
        return slots

    def _build_segments(self) -> list[tuple[Request, int]]:
        """Pick each running request's new tokens for this step and give them slots."""
        budget = self.config.chunked_prefill_size
        segments: list[tuple[Request, int]] = []
        for req in list(self.running):
            if req.status is not RequestStatus.RUNNING:  # finished or preempted earlier in this loop
                continue
            try:
                budget = self._grow(req, budget, segments)
            except Exception as exc:
                self._fail(req, exc)
        return [(r, n) for r, n in segments if r.status is RequestStatus.RUNNING]

    def _grow(self, req: Request, budget: int, segments: list[tuple[Request, int]]) -> int:
        """Give ``req`` slots for this step's tokens (appending its segment); the prefill budget left."""
        pending = req.fill_len - req.kv_len
        in_prefill = req.kv_len < len(req.prompt_ids) or pending > 1 + len(req.pending_forced)
        n = min(pending, budget) if in_prefill else pending
        held = req.slot_indices.numel() - req.kv_len  # slots taken ahead by an earlier decode step
        if n > held:
            need = n - held
            slots = None if in_prefill else self._decode_run(req, need)
            if slots is None:
                slots = self._alloc(need)
            while slots is None and not in_prefill and self._preempt(keep=req):
                slots = self._alloc(need)
            if slots is None and not in_prefill:  # nothing left to preempt: it cannot grow in this pool
                self._finish(req, "length", None)
                return budget
            if slots is None:  # a shorter prefill chunk: the slots held plus what the pool can give
                need = min(need, self.pool.num_free + self.tree.evictable_size)
                slots = self._alloc(need) if need > 0 else None
                n = held + (need if slots is not None else 0)
            if slots is not None:
                req.slot_indices = torch.cat([req.slot_indices, slots])
        if n <= 0:
            return budget
        if in_prefill:
            budget -= n
        segments.append((req, n))
        return budget

    def _decode_run(self, req: Request, need: int) -> torch.Tensor | None:
        """Up to :data:`DECODE_SLOT_RUN` slots (at least ``need``, at most what the request can still
        generate) while the pool can spare them without evicting and keeps every running request's
        headroom; else ``None`` (the caller takes exactly ``need``)."""
        room = min(req.params.max_new_tokens - len(req.output_ids), self.context_length - req.fill_len)
        run = max(need, min(DECODE_SLOT_RUN, room))
        if run <= need or self.pool.num_free - run < DECODE_HEADROOM * len(self.running):
            return None
        return self.pool.alloc(run)

    def _preempt(self, keep: Request) -> bool:
        """Retract the most recently admitted other request (its KV goes to the tree; it recomputes later)."""
        for victim in reversed(self.running):
            if victim is not keep:
                self._release(victim)
                self.running.remove(victim)
                victim.status = RequestStatus.WAITING
                self.waiting.insert(0, victim)
                self.stats["preemptions"] += 1
                return True
        return False

    def _release(self, req: Request) -> None:
        """Hand the request's computed KV to the tree (which frees duplicates) and drop its lock."""
        kv = req.kv_len
        if kv:
            self.tree.insert(req.fill_slice(0, kv), req.slot_indices[:kv])
        self.pool.free(req.slot_indices[kv:])
        if req.tree_node is not None:
            self.tree.unlock(req.tree_node)
        req.slot_indices = torch.empty(0, dtype=torch.int64)
        req.tree_node, req.tree_len, req.kv_len = None, 0, 0

    def _cache_prefix(self, req: Request) -> None:
        """After prefill, publish the prompt's KV in the tree so concurrent requests can share it."""
        if self.tree.disable or req.kv_len <= req.tree_len:
            return
        ids = req.fill_slice(0, req.kv_len)
        self.tree.insert(ids, req.slot_indices[: req.kv_len])
        slots, node = self.tree.match_prefix(ids)
        self.tree.lock(node)
        if req.tree_node is not None:
            self.tree.unlock(req.tree_node)
        req.tree_node, req.tree_len = node, len(slots)
        req.slot_indices = torch.cat([slots, req.slot_indices[req.kv_len :]])

    # ---- forward, sample, bookkeeping --------------------------------------------------------
    def _run_batch(self, segments: list[tuple[Request, int]]) -> None:
        """Forward, then sample; a failure is pinned on the requests that caused it and ends only them.

        The forward writes K/V only into slots its requests own and changes no bookkeeping, so a
        failed batch is retried in halves until the failing request is alone (``isolation_retries``).
        """
        try:
            logits, sample_rows, prompt_rows = self._forward_segments(segments)
        except Exception as exc:
            if len(segments) == 1:
                self._fail(segments[0][0], exc)
                return
            self.stats["isolation_retries"] += 1
            mid = len(segments) // 2
            self._run_batch(segments[:mid])
            self._run_batch(segments[mid:])
            return
        self.stats["forward_calls"] += 1

        to_sample: list[Request] = []
        for req, n in segments:
            try:
                self._after_forward(req, n, logits, prompt_rows, sample_rows, to_sample)
            except Exception as exc:
                self._fail(req, exc)
        if to_sample:
            self._sample_and_append(to_sample, take_rows(logits, [sample_rows[r.rid] for r in to_sample]))

    def _forward_segments(
        self, segments: list[tuple[Request, int]]
    ) -> tuple[torch.Tensor, dict[str, int], dict[str, tuple[int, int, int]]]:
        """One forward over the ragged batch; its logits rows, where each request's sample row and prompt rows are."""
        input_ids, positions, out_slots, kv_slots, prefix_lens, extend_lens = [], [], [], [], [], []
        logit_rows: list[int] = []
        sample_rows: dict[str, int] = {}  # rid -> index into the logits returned
        prompt_rows: dict[str, tuple[int, int, int]] = {}  # rid -> (first logits index, first position, count)
        offset = 0
        for req, n in segments:
            start = req.kv_len
            input_ids.extend(req.fill_slice(start, start + n))
            positions.extend(range(start, start + n))
            out_slots.append(req.slot_indices[start : start + n])
            kv_slots.append(req.slot_indices[: start + n])
            prefix_lens.append(start)
            extend_lens.append(n)
            if req.logprob_start_len >= 0:
                # the logits at position p score prompt token p + 1: rows from logprob_start_len to the last but one
                first = max(start, req.logprob_start_len)
                rows_end = min(start + n, len(req.prompt_ids) - 1)
                if first < rows_end:
                    prompt_rows[req.rid] = (len(logit_rows), first, rows_end - first)
                    logit_rows.extend(range(offset + first - start, offset + rows_end - start))
            if start + n == req.fill_len:
                sample_rows[req.rid] = len(logit_rows)
                logit_rows.append(offset + n - 1)
            offset += n
        batch = ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.int64),
            positions=torch.tensor(positions, dtype=torch.int64),
            out_slots=torch.cat(out_slots),
            prefix_lens=prefix_lens,
            extend_lens=extend_lens,
            kv_slots=kv_slots,
        )
        logits = self.forward(batch, torch.tensor(logit_rows, dtype=torch.int64)).float().cpu()
        return logits, sample_rows, prompt_rows

    def _after_forward(
        self,
        req: Request,
        n: int,
        logits: torch.Tensor,
        prompt_rows: dict[str, tuple[int, int, int]],
        sample_rows: dict[str, int],
        to_sample: list[Request],
    ) -> None:
        start = req.kv_len
        req.kv_len += n
        if start < len(req.prompt_ids):
            self.stats["prefill_tokens_computed"] += min(n, len(req.prompt_ids) - start)
        if start <= req.logprob_start_len < min(start + n, len(req.prompt_ids)) and not req.input_token_logprobs:
            # SGLang's contract: the token at logprob_start_len comes first, without a logprob
            req.input_token_logprobs.append((None, req.prompt_ids[req.logprob_start_len], None))
            if req.params.top_logprobs_num:
                req.input_top_logprobs.append(None)
        if req.rid in prompt_rows:
            self._record_prompt_logprobs(req, logits, *prompt_rows[req.rid])
        if req.kv_len == len(req.prompt_ids) and not req.output_ids:
            self._cache_prefix(req)
        if req.rid in sample_rows:
            req.pending_forced = []
            if len(req.output_ids) >= req.params.max_new_tokens:  # max_new_tokens == 0: scoring only
                if req.params.top_logprobs_num and not req.output_ids:
                    # SGLang reports the next-token distribution even when nothing is generated
                    row = logits[sample_rows[req.rid] : sample_rows[req.rid] + 1]
                    req.output_top_logprobs.append(_top_entries(row, req.params.top_logprobs_num)[0])
                self._finish(req, "length", None)
            else:
                to_sample.append(req)

    def _record_prompt_logprobs(self, req: Request, logits: torch.Tensor, row: int, position: int, count: int) -> None:
        """Logprobs of prompt tokens ``position + 1 ..`` from ``count`` logits rows starting at ``row``.
        Positions already recorded (a preempted request computes its prompt again) are skipped."""
        rows = logits[row : row + count]
        targets = torch.tensor(req.prompt_ids[position + 1 : position + 1 + count], dtype=torch.int64)
        lps = token_logprobs(rows, targets).tolist()
        tops = _top_entries(rows, req.params.top_logprobs_num) if req.params.top_logprobs_num else None
        for i, (lp, tok) in enumerate(zip(lps, targets.tolist())):
            if position + 1 + i == req.logprob_start_len + len(req.input_token_logprobs):
                req.input_token_logprobs.append((lp, tok, None))
                if tops is not None:
                    req.input_top_logprobs.append(tops[i])

    def _sample_and_append(self, reqs: list[Request], logits: torch.Tensor) -> None:
        with torch.inference_mode():  # logits may be the forward's own (inference) tensor, edited in place
            selection = select_tokens(reqs, logits, self.eos_token_ids)
        self.stats["isolation_retries"] += selection.retried_per_row
        for row, error in selection.failures.items():
            self._fail(reqs[row], error)
        for row, token in selection.tokens.items():
            req = reqs[row]
            try:
                if row in selection.logprobs:
                    entry, top = selection.logprobs[row]
                    req.output_token_logprobs.append(entry)
                    if top is not None:
                        req.output_top_logprobs.append(top)
                self._append_token(req, token)
            except Exception as exc:  # a processor bug ends its request, not the engine
                self._fail(req, exc)

    def _fail(self, req: Request, error: BaseException) -> None:
        """End ``req`` alone with ``error``: the step failure was its own, everyone else carries on."""
        logger.error("request %s failed: %s: %s", req.rid, type(error).__name__, error, exc_info=error)
        self.stats["requests_failed"] += 1
        req.error = error
        if req in self.waiting:
            self.waiting.remove(req)
        self._finish(req, "abort", None)

    def _append_token(self, req: Request, token: int) -> None:
        if req.first_token_time is None:
            import time

            req.first_token_time = time.perf_counter()
        req.output_ids.append(token)
        self.stats["generation_tokens_total"] += 1
        sp = req.params
        if token in sp.stop_token_ids or (token in self.eos_token_ids and not sp.ignore_eos):
            if req.processor is not None:
                req.processor.accept_token(token)
            self._finish(req, "stop", token)
            return
        new_tokens = [token]
        if req.processor is not None:
            req.processor.accept_token(token)
            room = min(sp.max_new_tokens - len(req.output_ids), self.context_length - req.fill_len)
            forced = req.processor.forced_tokens()[: max(room, 0)] if not req.processor.is_finished() else []
            if forced:
                req.output_ids.extend(forced)
                req.pending_forced = list(forced)
                req.jump_forward_tokens += len(forced)
                new_tokens += forced
                if sp.return_logprob or sp.top_logprobs_num:  # forced text has probability 1 under the constraint
                    req.output_token_logprobs.extend((0.0, t, None) for t in forced)
                    if sp.top_logprobs_num:
                        req.output_top_logprobs.extend([[(0.0, t, None)] for t in forced])
        delta = req.decoder.append(new_tokens)
        req.text += delta
        if (sp.stop or sp.stop_regex) and delta:
            hit = match_stop(req.text, sp.stop, sp.stop_regex, len(req.text) - len(delta))
            if hit is not None:
                start, end, matched = hit
                req.text = req.text[: end if sp.no_stop_trim else start]
                self._finish(req, "stop", matched, flush=False)
                return
        if req.processor is not None and req.processor.is_finished():
            self._finish(req, "stop", None)
        elif len(req.output_ids) >= sp.max_new_tokens or req.fill_len >= self.context_length:
            self._finish(req, "length", None)
        elif req.on_update is not None:
            req.on_update(req, False)

    def _finish(self, req: Request, finish_type: str, matched: int | str | None, flush: bool = True) -> None:
        if req.finished:
            return
        self._prefix_memo.pop(req.rid, None)
        if req in self.running:
            self._release(req)
            self.running.remove(req)
        if flush and finish_type != "abort":
            req.text += req.decoder.flush()
        req.status = RequestStatus.FINISHED
        req.finish_type, req.finish_matched = finish_type, matched
        if req.on_update is not None:
            try:
                req.on_update(req, True)
            except Exception:  # a broken reader must not take the step (and everyone in it) down
                logger.exception("delivering the end of request %s failed", req.rid)


def _top_entries(rows: torch.Tensor, k: int) -> list[list[tuple[float, int, None]]]:
    """The ``k`` most likely tokens of each logits row as ``(logprob, token_id, None)`` entries."""
    values, ids = top_logprobs(rows, k)
    return [[(v, i, None) for v, i in zip(vs, ts)] for vs, ts in zip(values.tolist(), ids.tolist())]
