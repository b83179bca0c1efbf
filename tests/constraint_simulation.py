"""The step loop in miniature: drive a processor with random logits, no model needed.

Tests use it to check that whatever the sampler picks, the output matches the constraint.
Each step is what the engine does:
``mask_logits`` -> sample -> ``accept_token`` -> ``forced_tokens``.

    >>> ids, finished = simulate_decode(proc, vocab_size=2048, seed=0)   # doctest: +SKIP
    >>> tokenizer.decode(ids)                                             # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SimulatedDecode:
    """What a simulated request produced."""

    token_ids: list[int] = field(default_factory=list)
    """Sampled and forced ids, EOS excluded."""
    finished: bool = False
    """Whether the processor reported ``is_finished`` (or EOS was sampled) within the step cap."""
    steps: int = 0
    """Sampling steps taken (each would be one model forward); forced tokens are free."""
    forced: int = 0
    """Tokens appended by jump-forward."""


def simulate_decode(
    processor,
    vocab_size: int,
    *,
    seed: int = 0,
    temperature: float = 1.0,
    max_steps: int = 256,
    eos_token_ids: frozenset[int] | set[int] = frozenset(),
) -> SimulatedDecode:
    """Sample from masked random logits until the processor finishes or ``max_steps`` run out.

    ``temperature=0`` is greedy. Random logits make the walk wander the whole FSM, so cap
    ``max_steps`` for constraints with unbounded repeats and check ``finished``.
    """
    generator = torch.Generator().manual_seed(seed)
    result = SimulatedDecode()
    while result.steps < max_steps and not processor.is_finished():
        logits = torch.randn(vocab_size, generator=generator) * 3.0
        processor.mask_logits(logits)
        if temperature == 0:
            token_id = int(torch.argmax(logits))
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            token_id = int(torch.multinomial(probs, 1, generator=generator))
        result.steps += 1
        processor.accept_token(token_id)
        if token_id in eos_token_ids:
            result.finished = True
            return result
        result.token_ids.append(token_id)
        forced = processor.forced_tokens()
        result.forced += len(forced)
        result.token_ids.extend(forced)
    result.finished = result.finished or processor.is_finished()
    return result
