"""Sampling: pure functions over a batch of logits rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sglite.runtime.sampling_params import SamplingParams


def apply_penalties(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    seen_ids: Sequence[torch.Tensor],
    output_ids: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Repetition (HF-style, over prompt and output), frequency and presence (OpenAI-style, over output)."""
    vocab = logits.shape[-1]
    for row, sp in enumerate(params):
        if sp.repetition_penalty != 1.0 and seen_ids[row].numel():
            ids = seen_ids[row].unique()
            picked = logits[row, ids]
            logits[row, ids] = torch.where(picked > 0, picked / sp.repetition_penalty, picked * sp.repetition_penalty)
        if (sp.frequency_penalty or sp.presence_penalty) and output_ids[row].numel():
            counts = torch.bincount(output_ids[row], minlength=vocab)[:vocab].to(logits.dtype)
            logits[row] -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_probs(probs: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor, min_ps: torch.Tensor) -> torch.Tensor:
    """Zero out tokens outside top-k, top-p (nucleus) and min-p, batched; rows need not be renormalised."""
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
    alone or batched with others.
    """
    next_ids = logits.argmax(dim=-1)
    sampled_rows = [i for i, sp in enumerate(params) if not sp.is_greedy]
    if not sampled_rows:
        return next_ids
    rows = torch.tensor(sampled_rows, device=logits.device)
    sub = [params[i] for i in sampled_rows]
    temps = torch.tensor([sp.temperature for sp in sub], dtype=logits.dtype, device=logits.device)
    probs = torch.softmax(logits[rows] / temps.unsqueeze(1), dim=-1)
    vocab = logits.shape[-1]
    top_ks = torch.tensor([sp.top_k if sp.top_k > 0 else vocab for sp in sub], device=logits.device)
    top_ps = torch.tensor([sp.top_p for sp in sub], dtype=logits.dtype, device=logits.device)
    min_ps = torch.tensor([sp.min_p for sp in sub], dtype=logits.dtype, device=logits.device)
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
