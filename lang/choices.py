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

    A choice that runs out of tokens while still tied loses to one that continues with a
    higher-than-impossible logprob, like greedy decoding restricted to the choices' token tree.
    """

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs,
                 unconditional_token_logprobs=None) -> ChoicesDecision:
        width = max(len(tokens) for tokens in input_token_logprobs)
        rows = [[lp for lp, *_ in tokens] + [float("-inf")] * (width - len(tokens)) for tokens in input_token_logprobs]
        best = max(range(len(choices)), key=lambda i: (rows[i], -i))
        return ChoicesDecision(choices[best], {"greedy_logprobs": rows})


class UnconditionalLikelihoodNormalized(ChoicesSamplingMethod):
    """Pick the choice whose tokens the prompt makes most *more* likely than they are on their own.

    Score = mean over the choice's tokens of ``logp(token | prompt) - logp(token | no prompt)``; a
    token without an unconditional logprob (the first token of a bare sequence) counts its
    conditional logprob only.
    """

    requires_unconditional_logprobs = True

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs,
                 unconditional_token_logprobs=None) -> ChoicesDecision:
        if unconditional_token_logprobs is None:
            raise ValueError("unconditional_likelihood_normalized needs unconditional_token_logprobs from the backend")
        scores = []
        for conditional, unconditional in zip(input_token_logprobs, unconditional_token_logprobs):
            diffs = [c[0] - (u[0] if u[0] is not None else 0.0) for c, u in zip(conditional, unconditional)]
            scores.append(sum(diffs) / len(diffs) if diffs else float("-inf"))
        best = _argmax(scores)
        return ChoicesDecision(choices[best], {"scores": scores})


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()
