"""How ``select`` turns per-choice token logprobs into a decision.

A backend scores every choice against the shared prefix in one batched call and hands the
logprobs of each choice's tokens to a ``ChoicesSamplingMethod``. The keyword names of
``__call__`` match SGLang's, so custom methods written for SGLang work unchanged.

    >>> token_length_normalized(choices=["yes", "no"], normalized_prompt_logprobs=[-0.5, -2.0],
    ...     input_token_logprobs=[[(-0.5, 1, None)], [(-2.0, 2, None)]], output_token_logprobs=[[], []]).decision
    'yes'
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

TokenLogprob = tuple  # (logprob, token_id, token_text_or_None)


@dataclass(frozen=True)
class ChoicesDecision:
    """The chosen string and what the method wants recorded in the variable's meta info."""

    decision: str
    meta_info: dict = field(default_factory=dict)


class ChoicesSamplingMethod(ABC):
    """Decides among choices from their token logprobs (conditioned on the prompt)."""

    requires_unconditional_logprobs: bool = False
    """True when the backend must also score each choice's tokens without the prompt."""

    @abstractmethod
    def __call__(
        self,
        *,
        choices: list[str],
        normalized_prompt_logprobs: list[float],
        input_token_logprobs: list[list[TokenLogprob]],
        output_token_logprobs: list[list[TokenLogprob]],
        unconditional_token_logprobs: list[list[TokenLogprob]] | None = None,
    ) -> ChoicesDecision: ...

    def __repr__(self) -> str:
        return type(self).__name__


def _argmax(values: list[float]) -> int:
    # First index wins ties, so the decision is deterministic in the choices' order.
    return max(range(len(values)), key=lambda i: (values[i], -i))


class TokenLengthNormalized(ChoicesSamplingMethod):
    """Pick the choice with the highest mean token logprob (SGLang's default)."""

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs,
                 unconditional_token_logprobs=None) -> ChoicesDecision:
        best = _argmax(normalized_prompt_logprobs)
        return ChoicesDecision(choices[best], {"scores": list(normalized_prompt_logprobs)})


class GreedyTokenSelection(ChoicesSamplingMethod):
    """Decode greedily among the choices: compare first-token logprobs, break ties with later tokens.

    As in SGLang, a choice that runs out of tokens while still tied continues with its own mean
    logprob (so a choice that is a prefix of a longer one competes on its average). Entries without
    a logprob (the first scored prompt token) are skipped.
    """

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs,
                 unconditional_token_logprobs=None) -> ChoicesDecision:
        values = [[lp for lp, *_ in tokens if lp is not None] for tokens in input_token_logprobs]
        width = max(len(v) for v in values)
        rows = [v + [sum(v) / len(v) if v else float("-inf")] * (width - len(v)) for v in values]
        remaining = list(range(len(choices)))
        for column in range(width):
            best = max(rows[i][column] for i in remaining)
            remaining = [i for i in remaining if rows[i][column] == best]
            if len(remaining) == 1:
                break
        return ChoicesDecision(choices[remaining[0]], {"greedy_logprob_matrix": rows})


class UnconditionalLikelihoodNormalized(ChoicesSamplingMethod):
    """Pick the choice whose tokens the prompt makes most *more* likely than they are on their own.

    Score = mean over the scored tokens of ``logp(token | prompt) - logp(token | no prompt)``; a
    token without an unconditional logprob (the first of the bare sequence) counts its conditional
    logprob only, and one without a conditional logprob is skipped.
    """

    requires_unconditional_logprobs = True

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs,
                 unconditional_token_logprobs=None) -> ChoicesDecision:
        if unconditional_token_logprobs is None:
            raise ValueError("unconditional_likelihood_normalized needs unconditional_token_logprobs from the backend")
        scores = []
        for conditional, unconditional in zip(input_token_logprobs, unconditional_token_logprobs):
            diffs = [c[0] - (u[0] if u[0] is not None else 0.0) for c, u in zip(conditional, unconditional) if c[0] is not None]
            scores.append(sum(diffs) / len(diffs) if diffs else float("-inf"))
        best = _argmax(scores)
        return ChoicesDecision(choices[best], {"normalized_unconditional_prompt_logprobs": scores})


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()
