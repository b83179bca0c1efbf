"""One step's token choice for a batch of requests, with per-row fault isolation.

The scheduler hands over each request's logits row; every row is processed (constraint mask,
``min_new_tokens`` ban, penalties), sanitized and sampled. A row whose processing raises, or that is
left with no allowed token, fails alone; if the batched draw raises, rows are drawn one by one so only
the rows that raise fail. The scheduler then ends failed requests and appends the others' tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from sglite.runtime.logits_processor import mask_rows
from sglite.runtime.request import Request
from sglite.runtime.sampler import NoCandidateError, apply_penalties, sample, sanitize_logits, token_logprobs, top_logprobs

TokenLogprob = tuple[float, int, None]


@dataclass
class Selection:
    """What a step chose: a token per surviving row, an error per failed row (row = index into the batch)."""

    tokens: dict[int, int] = field(default_factory=dict)
    logprobs: dict[int, tuple[TokenLogprob, list[TokenLogprob] | None]] = field(default_factory=dict)
    """Rows that asked for logprobs: (the chosen token's entry, the top alternatives or None)."""
    failures: dict[int, BaseException] = field(default_factory=dict)
    retried_per_row: bool = False
    """The batched draw raised and rows were drawn one by one."""


def process_logits(req: Request, row: torch.Tensor, eos_token_ids: set[int], mask: bool = True) -> None:
    """Constraint mask (unless already applied for the batch), ``min_new_tokens`` ban and penalties for one
    request's logits row, in place."""
    if mask and req.processor is not None:
        req.processor.mask_logits(row)
    if len(req.output_ids) < req.params.min_new_tokens:
        vocab = row.shape[-1]
        banned = [t for t in eos_token_ids | set(req.params.stop_token_ids) if 0 <= t < vocab]
        allowed = torch.isfinite(row)
        allowed[banned] = False
        if bool(allowed.any()):  # a constraint that can only end may end early rather than have no token
            row[banned] = float("-inf")
    sp = req.params
    if sp.repetition_penalty != 1.0 or sp.frequency_penalty or sp.presence_penalty:
        apply_penalties(
            row.unsqueeze(0),
            [sp],
            [torch.tensor(req.fill_ids, dtype=torch.int64)],
            [torch.tensor(req.output_ids, dtype=torch.int64)],
        )


def take_rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``t[rows]``, without the copy when ``rows`` is every row in order (a decode batch's logits).

        >>> t = torch.zeros(3, 2)
        >>> take_rows(t, [0, 1, 2]) is t, take_rows(t, [2, 0]).shape
        (True, torch.Size([2, 2]))
    """
    return t if len(rows) == t.shape[0] and rows == list(range(len(rows))) else t[rows]


def select_tokens(reqs: Sequence[Request], logits: torch.Tensor, eos_token_ids: set[int]) -> Selection:
    """Choose each request's next token from its row of ``logits`` (modified in place).

        >>> select_tokens([], torch.empty(0, 8), set()).tokens
        {}
    """
    selection = Selection()
    want_lp = [r.params.return_logprob or r.params.top_logprobs_num > 0 for r in reqs]
    raw = logits.clone() if any(want_lp) else logits  # logprobs are over the unprocessed logits
    try:  # one batched mask (llguidance fills the batch's bitmasks in parallel)
        mask_rows(logits, [(row, req.processor) for row, req in enumerate(reqs) if req.processor is not None])
        batch_masked = True
    except Exception:  # masking is idempotent: redo it row by row below so only the failing row fails
        batch_masked = False
    live: list[int] = []
    for row, req in enumerate(reqs):
        try:
            process_logits(req, logits[row], eos_token_ids, mask=not batch_masked)
            live.append(row)
        except Exception as exc:
            selection.failures[row] = exc
    alive = sanitize_logits(logits)
    for row in [r for r in live if not bool(alive[r])]:
        live.remove(row)
        selection.failures[row] = NoCandidateError("every token is masked for this request (constraint, stop tokens or penalties)")
    _draw(reqs, logits, live, selection)
    rows = [r for r in live if r in selection.tokens and want_lp[r]]
    if rows:
        lps = token_logprobs(raw[rows], torch.tensor([selection.tokens[r] for r in rows])).tolist()
        for row, lp in zip(rows, lps):
            top = None
            if reqs[row].params.top_logprobs_num:
                values, ids = top_logprobs(raw[row : row + 1], reqs[row].params.top_logprobs_num)
                top = [(v, i, None) for v, i in zip(values[0].tolist(), ids[0].tolist())]
            selection.logprobs[row] = ((lp, selection.tokens[row], None), top)
    return selection


def _draw(reqs: Sequence[Request], logits: torch.Tensor, rows: list[int], selection: Selection) -> None:
    """Sample ``rows`` in one batch; if that raises, row by row, failing only the rows that raise."""
    if not rows:
        return
    try:
        picked = sample(take_rows(logits, rows), [reqs[r].params for r in rows], [reqs[r].generator for r in rows]).tolist()
        selection.tokens.update(zip(rows, picked))
        return
    except Exception:
        selection.retried_per_row = True
    for r in rows:
        try:
            selection.tokens[r] = int(sample(logits[r : r + 1], [reqs[r].params], [reqs[r].generator])[0])
        except Exception as exc:
            selection.failures[r] = exc
