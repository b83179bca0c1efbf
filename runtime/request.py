"""One generation request and its state as it moves through the scheduler."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sglite.runtime.detokenizer import IncrementalDecoder
from sglite.runtime.logits_processor import LogitsProcessor
from sglite.runtime.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity equality: `req in running` must not compare every field
class Request:
    """Owned by the scheduler once submitted; callers see it only through ``on_update`` snapshots."""

    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    decoder: IncrementalDecoder
    processor: LogitsProcessor | None = None
    logprob_start_len: int = -1
    """Return prompt-token logprobs from this position on (-1: none)."""
    on_update: Callable[[Request, bool], None] | None = None
    """Called from the step loop with ``(request, finished)`` after each step that changed it."""
    generator: torch.Generator | None = None
    prompt_leader: Request | None = None
    """For sample 2..n of a prompt (``n`` > 1): the first sample, whose prefill the others wait for
    so the prompt is computed once and each sample decodes from the cached KV."""

    status: RequestStatus = RequestStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    slot_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    """Slots of the tokens whose K/V is computed (``kv_len`` of them), in order."""
    tree_node: object | None = None
    """The locked radix node covering ``slot_indices[:tree_len]`` (owned by the tree)."""
    tree_len: int = 0
    """Leading slots owned by the tree (``tree_len <= kv_len``); the rest are this request's own."""
    kv_len: int = 0
    """Tokens of ``fill_ids`` whose K/V sits in ``slot_indices``."""
    cached_tokens: int = 0
    """Prompt tokens served from the cache at first admission (``tree_len`` then; reported, never updated)."""
    finish_type: str | None = None
    finish_matched: int | str | None = None
    text: str = ""
    """Output text so far, stop strings trimmed."""
    output_token_logprobs: list[tuple[float, int, None]] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[float, int, None]]] = field(default_factory=list)
    input_token_logprobs: list[tuple[float | None, int, None]] = field(default_factory=list)
    """Prompt tokens from ``logprob_start_len`` on; the first one's logprob is None (SGLang's contract)."""
    input_top_logprobs: list[list[tuple[float, int, None]] | None] = field(default_factory=list)
    """The alternatives at each position of ``input_token_logprobs`` (None for the first), when ``top_logprobs_num``."""
    jump_forward_tokens: int = 0
    schema_check: tuple[bool, str | None] | None = None
    """JSON schema: (valid, error) of the finished output against the full schema, computed once."""
    pending_forced: list[int] = field(default_factory=list)
    """Tokens forced by the constraint, appended to the output and awaiting their forward pass."""
    created: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    error: BaseException | None = None

    @property
    def fill_ids(self) -> list[int]:
        """Every token the model must have seen: prompt then output."""
        return self.prompt_ids + self.output_ids

    @property
    def fill_len(self) -> int:
        """``len(fill_ids)`` without building the list."""
        return len(self.prompt_ids) + len(self.output_ids)

    def fill_slice(self, start: int, end: int) -> list[int]:
        """``fill_ids[start:end]`` without copying the whole prompt (the scheduler's per-step read)."""
        num_prompt = len(self.prompt_ids)
        if end <= num_prompt:
            return self.prompt_ids[start:end]
        if start >= num_prompt:
            return self.output_ids[start - num_prompt : end - num_prompt]
        return self.prompt_ids[start:] + self.output_ids[: end - num_prompt]

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def meta_info(self, logprobs_since: tuple[int, int] = (0, 0)) -> dict:
        """Counts, finish reason and logprobs; the logprob lists start at ``logprobs_since``
        (input, output) so a stream sends each entry once instead of the whole list every chunk.

            >>> req.meta_info(logprobs_since=(0, 5))["output_token_logprobs"]   # entries 5.. only  # doctest: +SKIP
        """
        info = {
            "id": self.rid,
            "prompt_tokens": len(self.prompt_ids),
            "completion_tokens": len(self.output_ids),
            "cached_tokens": self.cached_tokens,
            "finish_reason": (
                None if self.finish_type is None else {"type": self.finish_type, "matched": self.finish_matched}
            ),
            "jump_forward_tokens": self.jump_forward_tokens,
            "e2e_latency": time.perf_counter() - self.created,
        }
        checker = getattr(self.processor, "checker", None)
        if checker is not None and self.finished and self.error is None:
            if self.schema_check is None:
                verdict = checker.check(self.text)
                self.schema_check = (verdict.valid, verdict.error)
            info["schema_valid"], error = self.schema_check
            if error is not None:
                info["schema_error"] = error
        if self.params.return_logprob or self.params.top_logprobs_num:
            # SGLang's keys are all present when logprobs are asked for (empty lists when none apply).
            input_since, output_since = logprobs_since
            info["input_token_logprobs"] = self.input_token_logprobs[input_since:]
            info["output_token_logprobs"] = self.output_token_logprobs[output_since:]
            if self.params.top_logprobs_num:
                info["input_top_logprobs"] = self.input_top_logprobs[input_since:]
                info["output_top_logprobs"] = self.output_top_logprobs[output_since:]
        if self.error is not None:
            info["error"] = str(self.error)
            info["error_type"] = type(self.error).__name__
        return info
