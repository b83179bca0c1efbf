"""Sampling: pure functions over a batch of logits rows, numerically safe for every accepted parameter.

Whatever a request asks for (a temperature of 1e-38, a repetition penalty of 1e-40, a constraint that
leaves one token) and whatever the model emits (``inf``, ``nan``), a row either yields a token from a
well-formed distribution or is reported as having no candidate at all; it never poisons its neighbours.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sglite.runtime.kernels.greedy_pick import greedy_pick
from sglite.runtime.sampling_params import SamplingParams


class NoCandidateError(ValueError):
    """Every token of a row is masked (constraint, stop tokens under ``min_new_tokens``, non-finite logits)."""


def apply_penalties(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    seen_ids: Sequence[torch.Tensor],
    output_ids: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Repetition (HF-style, over prompt and output), frequency and presence (OpenAI-style, over output).

    A tiny repetition penalty may push a logit to ``inf``; ``sanitize_logits`` gives that row a
    well-defined distribution (the ``inf`` tokens, uniformly), the limit of the penalty going to 0.
    """
    vocab = logits.shape[-1]
    for row, sp in enumerate(params):
        if sp.repetition_penalty != 1.0 and seen_ids[row].numel():
            ids = seen_ids[row][seen_ids[row] < vocab].unique()
            picked = logits[row, ids]
            logits[row, ids] = torch.where(picked > 0, picked / sp.repetition_penalty, picked * sp.repetition_penalty)
        if (sp.frequency_penalty or sp.presence_penalty) and output_ids[row].numel():
            counts = torch.bincount(output_ids[row], minlength=vocab)[:vocab].to(logits.dtype)
            logits[row] -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def sanitize_logits(logits: torch.Tensor) -> torch.Tensor:
    """Make every row samplable in place; return which rows still have a candidate token.

    ``nan`` becomes ``-inf`` (never chosen); a row with ``+inf`` entries keeps only those, at equal
    weight (the limit of its distribution); a row left with no finite entry has no candidate.

        >>> rows = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0], [float("-inf"), float("nan")]])
        >>> sanitize_logits(rows).tolist(), rows[1].tolist()
        ([True, True, False], [0.0, -inf])
    """
    row_max = logits.amax(dim=-1)  # nan if the row has a nan, inf if it has +inf, -inf if all masked
    if bool(torch.isfinite(row_max).all()):
        return torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)  # the usual case: one pass
    logits.nan_to_num_(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    pos_inf = logits == float("inf")
    inf_rows = pos_inf.any(dim=-1)
    if bool(inf_rows.any()):
        rows = inf_rows.nonzero().flatten()
        logits[rows] = torch.where(pos_inf[rows], 0.0, float("-inf")).to(logits.dtype)
    return torch.isfinite(logits).any(dim=-1)


def filter_probs(probs: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor, min_ps: torch.Tensor) -> torch.Tensor:
    """Zero out tokens outside top-k, top-p (nucleus) and min-p, batched; rows need not be renormalised.

    The most likely token always survives, so no filter setting can empty a row.
    """
    sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(probs.shape[-1], device=probs.device).expand_as(sorted_probs)
    keep = ranks < top_ks.unsqueeze(1)
    # nucleus: keep a token while the mass strictly before it is below top_p (the top token always stays)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    keep &= mass_before < top_ps.unsqueeze(1)
    keep &= sorted_probs >= (min_ps * sorted_probs[:, 0]).unsqueeze(1)
    keep[:, 0] = True
    sorted_probs = sorted_probs.masked_fill(~keep, 0.0)
    return torch.zeros_like(probs).scatter_(-1, sorted_idx, sorted_probs)


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """One token per row: argmax for greedy rows, else a draw from the filtered distribution.

    Each request has its own generator, so a seeded request samples the same tokens whether it runs
    alone or batched with others. ``logits`` are sanitized in place; a row with no candidate token
    raises ``NoCandidateError`` (callers drop such rows first, see ``sanitize_logits``).

        >>> sample(torch.tensor([[0.0, 5.0, 1.0]]), [SamplingParams(temperature=1e-30)], [None]).tolist()
        [1]
    """
    # The usual case in one pass: each row's first maximum (the greedy token; ties go to the lowest id, as
    # argmax), -1 where that maximum is not finite and the row needs sanitizing first.
    next_ids = greedy_pick(logits)
    if bool((next_ids < 0).any()):
        alive = sanitize_logits(logits)
        if not bool(alive.all()):
            dead = (~alive).nonzero().flatten().tolist()
            raise NoCandidateError(f"rows {dead} have no allowed token")
        next_ids = logits.argmax(dim=-1)
    sampled_rows = [i for i, sp in enumerate(params) if not sp.is_greedy]
    if not sampled_rows:
        return next_ids
    rows = torch.tensor(sampled_rows, device=logits.device)
    sub = [params[i] for i in sampled_rows]
    temps = torch.tensor([sp.temperature for sp in sub], dtype=torch.float32, device=logits.device)
    picked = logits[rows].float()
    # Shift the maximum to 0 before dividing: every scaled logit is then <= 0 (or -inf) and the top one
    # is exactly 0, so no temperature can overflow to inf or make the softmax 0/0.
    scaled = (picked - picked.max(dim=-1, keepdim=True).values) / temps.unsqueeze(1)
    probs = torch.softmax(scaled, dim=-1)
    vocab = logits.shape[-1]
    top_ks = torch.tensor([sp.top_k if sp.top_k > 0 else vocab for sp in sub], device=logits.device)
    top_ps = torch.tensor([sp.top_p for sp in sub], dtype=probs.dtype, device=logits.device)
    min_ps = torch.tensor([sp.min_p for sp in sub], dtype=probs.dtype, device=logits.device)
    # Sorting the vocabulary is the costly part; rows that filter nothing skip it (and keep their tail
    # tokens, which a cumulative sum can push past top_p=1.0 by rounding).
    if any(0 < sp.top_k < vocab or sp.top_p < 1.0 or sp.min_p > 0.0 for sp in sub):
        probs = filter_probs(probs, top_ks, top_ps, min_ps)
    for j, row in enumerate(sampled_rows):
        next_ids[row] = torch.multinomial(probs[j], 1, generator=generators[row]).squeeze(0)
    return next_ids


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of ``token_ids[i]`` under row ``i`` of the raw (unprocessed) logits."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


def top_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely tokens of each row and their log-probabilities."""
    values, ids = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
    return values, ids
