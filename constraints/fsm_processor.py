"""The per-request logits processor: one FSM state, advanced token by token.

The outlines backend's processor (``outlines_backend``): built in the caller's thread, then
driven by the step loop through ``runtime.logits_processor.LogitsProcessor``:

    >>> proc = build_logits_processor(tokenizer, vocab_size, regex=r"\\d{3}-\\d{4}", backend="outlines")  # doctest: +SKIP
    >>> proc.mask_logits(logits_row)          # forbidden tokens -> -inf, in place  # doctest: +SKIP
    >>> proc.accept_token(sampled_id)  # doctest: +SKIP
    >>> proc.forced_tokens()                  # jump-forward: ids to append unsampled  # doctest: +SKIP
    >>> proc.is_finished()                    # accepting and nothing more allowed (or EOS taken)  # doctest: +SKIP
"""

from __future__ import annotations

import torch

from sglite.constraints.compiler import CompiledFSM
from sglite.constraints.jump_forward import plan_jump_forward
from sglite.constraints.output_check import SchemaChecker


class FSMLogitsProcessor:
    """Masks a request's logits to the tokens its regex FSM allows; owned by one request.

    Not thread-safe: only the step loop calls it after construction.
    """

    def __init__(self, fsm: CompiledFSM, tokenizer, vocab_size: int, *, jump_forward: bool = True) -> None:
        self.fsm = fsm
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.jump_forward = jump_forward
        self.state: int = fsm.initial_state
        """The current FSM state (``fsm_state``)."""
        self.jump_forward_tokens = 0
        """How many tokens ``forced_tokens`` has returned over the request's life."""
        self.violation: str | None = None
        """Set (and the processor finished) if a token outside the mask was accepted."""
        self._eos_accepted = False
        self.warnings: tuple[str, ...] = ()
        """Relaxations the backend took to compile this constraint (their keywords are checked on the output)."""
        self.checker: SchemaChecker | None = None
        """JSON schema: validates the finished output against the full schema (``schema_valid``)."""

    @property
    def regex(self) -> str:
        """The regex this processor enforces (after anchors were stripped)."""
        return self.fsm.regex

    def mask_logits(self, logits: torch.Tensor) -> None:
        """Set every forbidden token of the ``[vocab]`` row to ``-inf``, in place (one cached-bias ``add_``)."""
        logits.add_(self.fsm.logit_bias(self.state, logits.shape[-1], logits.device, logits.dtype))

    def accept_token(self, token_id: int) -> None:
        """Advance over a sampled token; EOS in an accepting state finishes the request."""
        if self.is_finished():
            return
        token_id = int(token_id)
        if token_id in self.fsm.vocabulary.eos_token_ids:
            if self.fsm.is_final(self.state):
                self._eos_accepted = True
            else:
                self.violation = f"EOS token {token_id} before the constraint was satisfied"
            return
        next_state = self.fsm.next_state(self.state, token_id)
        if next_state is None:
            # Only a caller bypassing the mask gets here; stop rather than corrupt the output.
            self.violation = f"token {token_id} is not allowed in FSM state {self.state}"
            return
        self.state = next_state

    def is_finished(self) -> bool:
        """True once EOS was accepted, or the state accepts and allows nothing but EOS."""
        if self._eos_accepted or self.violation is not None:
            return True
        return self.fsm.is_final(self.state) and not self.fsm.has_continuation(self.state)

    def forced_tokens(self) -> list[int]:
        """Tokens the constraint forces next (already accepted here); ``[]`` when none or disabled."""
        if not self.jump_forward or self.is_finished():
            return []
        plan = plan_jump_forward(self.fsm, self.state, self.tokenizer)
        if plan.token_ids:
            self.state = plan.end_state
            self.jump_forward_tokens += len(plan.token_ids)
        return plan.token_ids

    def allowed_token_ids(self) -> list[int]:
        """The ids ``mask_logits`` leaves alone in the current state (sorted; for tests and tools)."""
        return sorted(t for t in self.fsm.allowed_tokens(self.state) if t < self.vocab_size)

    def __repr__(self) -> str:
        return f"FSMLogitsProcessor(regex={self.fsm.regex[:60]!r}, state={self.state}, finished={self.is_finished()})"
