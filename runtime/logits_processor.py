"""The per-request hook through which constraints steer sampling, without the scheduler knowing them."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class LogitsProcessor(Protocol):
    """One instance per request, owned by it; called from the step loop only.

    Each step: ``mask_logits`` on the request's logits row, then the sampled token goes to
    ``accept_token``; then ``forced_tokens`` may return tokens to append without sampling
    (jump-forward), over which the processor has already advanced. ``is_finished`` ends the
    request (finish reason ``stop``) when the constraint can go no further. A JSON-schema processor
    may carry a ``checker`` (``constraints.output_check.SchemaChecker``): the finished request's
    meta info then reports ``schema_valid`` and, when false, ``schema_error``.
    """

    def mask_logits(self, logits: torch.Tensor) -> None:
        """In place on a ``[vocab]`` float row (the model's vocab may exceed the tokenizer's)."""

    def accept_token(self, token_id: int) -> None: ...

    def is_finished(self) -> bool: ...

    def forced_tokens(self) -> list[int]: ...


def mask_rows(logits: torch.Tensor, rows: list[tuple[int, LogitsProcessor]]) -> None:
    """Mask each ``(row, processor)`` of ``logits`` in place.

    Processors whose class offers a ``mask_rows(logits, rows)`` classmethod get all their rows
    at once (llguidance computes the batch's bitmasks in parallel, without the GIL); the rest get
    ``mask_logits`` row by row.
    """
    groups: dict[type, list[tuple[int, LogitsProcessor]]] = {}
    for row, processor in rows:
        groups.setdefault(type(processor), []).append((row, processor))
    for cls, members in groups.items():
        batched = getattr(cls, "mask_rows", None)
        if batched is not None and len(members) > 1:
            batched(logits, members)
        else:
            for row, processor in members:
                processor.mask_logits(logits[row])
