"""Caller-side input processing: prompts and sampling parameters become validated requests.

Runs in the caller's thread (or a worker thread for ``async_generate``), so tokenization and
constraint compilation never stall the step loop; every error here is raised before queuing.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from sglite.runtime.config import EngineConfig
from sglite.runtime.detokenizer import IncrementalDecoder
from sglite.runtime.prompts import prompt_batch
from sglite.runtime.request import Request
from sglite.runtime.sampling_params import SamplingParams


def eos_token_ids(model_path: str, model_config, tokenizer) -> set[int]:
    """Every id that ends generation: the config's, generation_config.json's and the tokenizer's EOS."""
    ids: set[int] = set()

    def add(value: int | Iterable[int] | None) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)

    add(getattr(model_config, "eos_token_id", None))
    try:
        from transformers import GenerationConfig

        add(GenerationConfig.from_pretrained(model_path).eos_token_id)
    except (OSError, ValueError):  # no generation_config.json
        pass
    add(tokenizer.eos_token_id)
    return ids


class ContextLengthError(ValueError):
    """The prompt plus the ``max_new_tokens`` the caller asked for do not fit the model's context.

    One rule on every route (vLLM's and OpenAI's): an explicit ``max_new_tokens`` is a promise the
    engine could not keep, so it is refused rather than silently cut short. Left unset, generation
    simply stops at the context (``finish_reason`` length).

        >>> str(ContextLengthError(2048, 2000, 100)).split(". ")[:2]
        ["This model's maximum context length is 2048 tokens", 'However, you requested 2100 tokens (2000 in the messages, 100 in the completion)']
    """

    def __init__(self, context_length: int, prompt_tokens: int, max_new_tokens: int) -> None:
        self.context_length = context_length
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        super().__init__(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{prompt_tokens + max_new_tokens} tokens ({prompt_tokens} in the messages, {max_new_tokens} in the completion). "
            "Please reduce the length of the messages or completion."
        )

    def __reduce__(self) -> tuple:  # picklable with its own arguments (it crosses process boundaries to Ray replicas)
        return type(self), (self.context_length, self.prompt_tokens, self.max_new_tokens)


@dataclass(frozen=True)
class GenerateInput:
    """One ``generate`` call's arguments, as the engine hands them to the input processor.

        >>> GenerateInput(prompt=["a", "b"], sampling_params={"max_new_tokens": 4}).rid is None
        True
    """

    prompt: str | list[str] | None = None
    """Text: one string or a batch of strings (exactly one of ``prompt`` / ``input_ids``)."""
    input_ids: list[int] | list[list[int]] | None = None
    """Token ids: one list or a batch of lists."""
    sampling_params: dict | list[dict] | None = None
    """One dict for every prompt, or one per prompt."""
    return_logprob: bool = False
    """Return each output token's logprob."""
    logprob_start_len: int = -1
    """Also return prompt-token logprobs from this position on (-1: none); the first one's is None, as in SGLang."""
    top_logprobs_num: int = 0
    """Alternatives per position in the top-logprob lists."""
    rid: str | list[str] | None = None
    """Request ids: one per prompt, unique while in flight (None: generated)."""


class InputProcessor:
    """Tokenizes and validates prompts, parses sampling parameters and compiles constraints."""

    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        context_length: int,
        pool_size: int,
        eos_token_ids: set[int],
        config: EngineConfig,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.pool_size = pool_size
        self.eos_token_ids = eos_token_ids
        self.config = config
        self._ids = itertools.count()
        self.max_chars_per_token = max_chars_per_token(tokenizer)
        self._constraints = None  # the engine's grammar backend, built on first use (~1 s for 50k tokens)
        self._constraints_lock = threading.Lock()

    @property
    def constraints(self):
        """This engine's grammar backend (``sglite.constraints.make_backend``): its caches are this engine's."""
        if self._constraints is None:
            with self._constraints_lock:
                if self._constraints is None:
                    from sglite.constraints import ConstraintLimits, make_backend

                    regex_limits = {"max_regex_size": self.config.max_regex_size, "max_regex_length": self.config.max_regex_length}
                    self._constraints = make_backend(
                        self.config.grammar_backend, self.tokenizer, self.vocab_size, self.eos_token_ids,
                        ConstraintLimits(**{name: value for name, value in regex_limits.items() if value is not None}),
                    )
        return self._constraints

    def check_prompt_chars(self, num_chars: int, what: str = "prompt") -> None:
        """Refuse text that cannot fit the context before paying for its tokenization.

        No token covers more than ``max_chars_per_token`` characters, so text longer than that
        many per context position is over the context length whatever it tokenizes to.
        """
        if num_chars > self.context_length * self.max_chars_per_token:
            raise ValueError(
                f"{what} is {num_chars} characters, necessarily over the context length of {self.context_length} tokens "
                f"(no token here covers more than {self.max_chars_per_token} characters)"
            )

    def make_requests(self, given: GenerateInput) -> tuple[list[Request], bool]:
        """One validated request per prompt, and whether the caller gave a single prompt."""
        if (given.prompt is None) == (given.input_ids is None):
            raise ValueError("give exactly one of prompt or input_ids")
        source = given.prompt if given.prompt is not None else given.input_ids
        sampling_params, rid = given.sampling_params, given.rid
        if not isinstance(source, (str, list, tuple)):
            name = "prompt" if given.prompt is not None else "input_ids"
            raise ValueError(f"{name} must be a string, a list of token ids or a list of those, got {type(source).__name__}")
        prompts, single = prompt_batch(source)
        if not prompts:
            raise ValueError("prompt: the list of prompts is empty")
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(prompts):
                raise ValueError(
                    f"sampling_params: got {len(sampling_params)} for {len(prompts)} prompts; give one dict or one per prompt"
                )
            params_list = sampling_params
        else:
            params_list = [sampling_params] * len(prompts)
        rids = [rid] if isinstance(rid, str) else (rid or [None] * len(prompts))
        if len(rids) != len(prompts):
            raise ValueError(f"rid: got {len(rids)} ids for {len(prompts)} prompts; give one per prompt")
        named = [r for r in rids if r is not None]
        if len(set(named)) != len(named):
            raise ValueError("rid: request ids must be unique within a batch")
        reqs: list[Request] = []
        for p, sp, r in zip(prompts, params_list, rids):
            head = self.make_request(p, sp, r, given)
            reqs.append(head)
            reqs.extend(self.parallel_sample(head, index) for index in range(1, head.params.n))
        return reqs, single and len(reqs) == 1

    def parallel_sample(self, first: Request, index: int) -> Request:
        """Sample ``index`` (1..n-1) of ``first``'s prompt: its own seed, constraint state and id; it
        waits for ``first``'s prefill and decodes from the cached prompt (see the scheduler's admission)."""
        sp = dataclasses.replace(first.params)
        if sp.seed is not None:  # one seed for all n would make n identical samples
            sp.seed = (sp.seed + index) % (2**63)
        ids = first.prompt_ids
        return Request(
            rid=f"{first.rid}-{index}",
            prompt_ids=ids,
            params=sp,
            decoder=IncrementalDecoder(self.tokenizer, sp.skip_special_tokens, ids),
            processor=self._processor(sp),
            logprob_start_len=first.logprob_start_len,
            generator=self._generator(sp),
            prompt_leader=first,
        )

    def _processor(self, sp: SamplingParams):
        if not sp.has_constraint:
            return None
        from sglite.constraints import backend_processor

        return backend_processor(
            self.constraints,
            jump_forward=self.config.jump_forward,
            regex=sp.regex,
            json_schema=sp.json_schema,
            choices=sp.choices,
            ebnf=sp.ebnf,
            json_layout=sp.json_layout,
            strict=sp.strict,
        )

    def _generator(self, sp: SamplingParams) -> torch.Generator:
        generator = torch.Generator()
        generator.manual_seed(sp.seed if sp.seed is not None else self.config.random_seed * 1_000_003 + next(self._ids))
        return generator

    def _check_stop_token_ids(self, sp: SamplingParams) -> None:
        bad = [t for t in sp.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise ValueError(f"sampling parameter 'stop_token_ids': token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if sp.min_new_tokens and len(set(sp.stop_token_ids) | self.eos_token_ids) >= self.vocab_size:
            raise ValueError(
                "sampling parameter 'stop_token_ids' covers the whole vocabulary, so no token can be generated "
                f"before min_new_tokens={sp.min_new_tokens}; drop min_new_tokens or some stop tokens"
            )

    def make_request(self, prompt, params, rid: str | None, given: GenerateInput) -> Request:
        """The request for one prompt of ``given``, with its own sampling ``params`` and ``rid``."""
        return_logprob, logprob_start_len, top_logprobs_num = (
            given.return_logprob, given.logprob_start_len, given.top_logprobs_num
        )
        sp = SamplingParams.from_dict(dict(params) if isinstance(params, dict) else params)
        if return_logprob:
            sp.return_logprob = True
        if top_logprobs_num:
            sp.top_logprobs_num = int(top_logprobs_num)
            sp.validate()
        self._check_stop_token_ids(sp)
        if isinstance(prompt, str):
            self.check_prompt_chars(len(prompt))
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            vocab = self.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        else:
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt is empty: give at least one token")
        if len(ids) >= self.context_length:
            raise ValueError(
                f"prompt is {len(ids)} tokens, over the context length of {self.context_length} "
                "(prompt plus at least one generated token must fit)"
            )
        if _explicit_max_new_tokens(params) and len(ids) + sp.max_new_tokens > self.context_length:
            raise ContextLengthError(self.context_length, len(ids), sp.max_new_tokens)
        if len(ids) + 1 > self.pool_size:
            raise ValueError(f"prompt is {len(ids)} tokens but the KV pool holds only {self.pool_size}; raise max_total_tokens")
        if not isinstance(logprob_start_len, int) or logprob_start_len < -1:
            raise ValueError(f"logprob_start_len must be an int >= -1, got {logprob_start_len!r}")
        if sp.return_logprob and logprob_start_len > len(ids):
            raise ValueError(
                f"logprob_start_len ({logprob_start_len}) is beyond the prompt's {len(ids)} tokens; give at most {len(ids)}"
            )
        processor = self._processor(sp)
        generator = self._generator(sp)
        return Request(
            rid=rid or uuid.uuid4().hex,
            prompt_ids=ids,
            params=sp,
            decoder=IncrementalDecoder(self.tokenizer, sp.skip_special_tokens, ids),
            processor=processor,
            logprob_start_len=logprob_start_len if (sp.return_logprob and logprob_start_len >= 0) else -1,
            generator=generator,
        )


def _explicit_max_new_tokens(params) -> bool:
    """Whether the caller chose ``max_new_tokens`` (a default is not a promise: it stops at the context)."""
    if isinstance(params, SamplingParams):
        return True
    return isinstance(params, dict) and params.get("max_new_tokens") is not None


def max_chars_per_token(tokenizer) -> int:
    """The most characters one token of ``tokenizer`` can stand for (an upper bound, from its vocabulary).

    A vocabulary entry's raw string is never shorter than the text it decodes to (byte-level BPE spells
    each byte as one character, SentencePiece spells a space as one ``▁``), so its longest entry bounds
    any token; special tokens (``<|endoftext|>``) are in the vocabulary too.
    """
    longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    return max(longest, 1)
