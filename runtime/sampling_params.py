"""Per-request sampling parameters, with SGLang's names and validation that names the field."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this sample greedily: the distribution is already one-hot to float precision."""


@dataclass(frozen=True)
class Range:
    """The allowed values of one float sampling parameter; the engine and the HTTP protocol both read it.

        >>> LIMITS["temperature"].field_bounds(), LIMITS["top_p"].field_bounds()
        ({'ge': 0.0, 'le': 2.0}, {'gt': 0.0, 'le': 1.0})
    """

    low: float
    high: float
    low_open: bool = False
    """``low`` itself is excluded (``top_p`` 0 would keep no token)."""

    def field_bounds(self) -> dict[str, float]:
        """The bounds as pydantic ``Field`` keywords."""
        return {"gt" if self.low_open else "ge": self.low, "le": self.high}


LIMITS: dict[str, Range] = {
    "temperature": Range(0.0, 2.0),
    "top_p": Range(0.0, 1.0, low_open=True),
    "min_p": Range(0.0, 1.0),
    "repetition_penalty": Range(0.0, 100.0, low_open=True),
    "frequency_penalty": Range(-2.0, 2.0),
    "presence_penalty": Range(-2.0, 2.0),
}
"""Float sampling parameters and their ranges (temperature as in OpenAI's API: at most 2)."""


@dataclass
class SamplingParams:
    """How one request samples and when it stops.

        >>> SamplingParams.from_dict({"max_new_tokens": 16, "temperature": 0})
        SamplingParams(max_new_tokens=16, ...)
    """

    max_new_tokens: int = 128
    """Generate at most this many tokens; 0 only scores the prompt."""
    min_new_tokens: int = 0
    """EOS and stop tokens are masked until this many tokens exist."""
    temperature: float = 1.0
    """0 (or anything below ``GREEDY_TEMPERATURE``) means greedy (argmax)."""
    top_p: float = 1.0
    top_k: int = -1
    """-1 (or 0) keeps the whole vocabulary."""
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    """HF-style: logits of tokens already seen (prompt or output) are divided (>0) or multiplied (<0)."""
    frequency_penalty: float = 0.0
    """OpenAI-style: subtracted once per earlier occurrence in the output."""
    presence_penalty: float = 0.0
    """OpenAI-style: subtracted once if the token occurred in the output."""
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    seed: int | None = None
    """Seeds this request's own generator: same seed, same sample, whatever else is batched."""
    return_logprob: bool = False
    top_logprobs_num: int = 0
    regex: str | None = None
    json_schema: str | dict | None = None
    choices: list[str] | None = None
    """Constrain the output to exactly one of these strings."""
    ebnf: str | None = None
    """Constrain the output to a context-free grammar: Lark syntax, or GBNF/EBNF with ``::=`` rules."""
    json_layout: str | None = None
    """Whitespace of ``json_schema`` output: ``spaced`` (default, as ``json.dumps``), ``compact``, ``flexible``,
    ``indent2`` or ``indent4`` (``json.dumps(obj, indent=n)``)."""
    strict: bool = False
    """JSON schema: refuse (400) a schema with a keyword the grammar cannot enforce exactly. By default it is
    relaxed (one warning) and the finished output is validated: ``meta_info["schema_valid"]``/``schema_error``."""
    n: int = 1
    """Samples per prompt (SGLang's parallel sampling): the prompt is prefilled once, then each sample
    decodes from the cached prompt; ``generate`` answers a list of ``n`` results per prompt."""
    stop_regex: list[str] = field(default_factory=list)
    """Stop when the output text matches one of these regular expressions (Python ``re`` syntax)."""
    no_stop_trim: bool = False
    """Keep the matched stop string (or regex match) at the end of the text instead of trimming it."""
    # SGLang fields that are no-ops here (accepted so SGLang clients work; see the README's table).
    spaces_between_special_tokens: bool = True
    """No-op: fast tokenizers never insert spaces between special tokens."""
    stream_interval: int | None = None
    """No-op: every token is streamed as it is decoded (the text is the same)."""
    custom_params: dict | None = None
    """No-op: only read by custom logit processors, which this engine does not load."""

    @classmethod
    def from_dict(cls, params: dict[str, Any] | SamplingParams | None) -> SamplingParams:
        """Build and validate; an unknown key or a bad value raises ``ValueError`` naming the field."""
        if params is None:
            return cls()
        if isinstance(params, SamplingParams):
            params.validate()
            return params
        if not isinstance(params, dict):
            raise ValueError(f"sampling_params must be a dict, got {type(params).__name__}")
        params = _sglang_aliases(params)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(
                f"unknown sampling parameter(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}"
            )
        values = {k: v for k, v in params.items() if v is not None or k in ("seed", "regex", "json_schema", "choices", "ebnf")}
        if isinstance(values.get("stop"), str):
            values["stop"] = [values["stop"]]
        if isinstance(values.get("stop_regex"), str):
            values["stop_regex"] = [values["stop_regex"]]
        if isinstance(values.get("stop"), tuple):
            values["stop"] = list(values["stop"])
        if isinstance(values.get("stop_token_ids"), int) and not isinstance(values.get("stop_token_ids"), bool):
            values["stop_token_ids"] = [values["stop_token_ids"]]
        sp = cls(**values)
        sp.validate()
        return sp

    def validate(self) -> None:
        _check_int(self, "max_new_tokens", low=0)
        _check_int(self, "min_new_tokens", low=0)
        _check_int(self, "top_k", low=-1)
        _check_int(self, "top_logprobs_num", low=0, high=100)
        for name, allowed in LIMITS.items():
            _check_float(self, name, allowed)
        _check_int(self, "n", low=1, high=MAX_SAMPLES)
        if self.stream_interval is not None:
            _check_int(self, "stream_interval", low=1)
        if self.custom_params is not None and not isinstance(self.custom_params, dict):
            raise ValueError(f"sampling parameter 'custom_params' must be an object, got {self.custom_params!r}")
        for name in ("ignore_eos", "skip_special_tokens", "return_logprob", "no_stop_trim", "spaces_between_special_tokens",
                     "strict"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"sampling parameter '{name}' must be a bool, got {getattr(self, name)!r}")
        if self.seed is not None:
            _check_int(self, "seed", low=0, high=2**63 - 1)
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"sampling parameter 'stop' must be a string or a list of non-empty strings, got {self.stop!r}")
        if len(self.stop) > 16:
            raise ValueError(f"sampling parameter 'stop' allows at most 16 strings, got {len(self.stop)}")
        _check_stop_regex(self.stop_regex)
        if not isinstance(self.stop_token_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            raise ValueError(f"sampling parameter 'stop_token_ids' must be a list of token ids, got {self.stop_token_ids!r}")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"sampling parameter 'min_new_tokens' ({self.min_new_tokens}) exceeds 'max_new_tokens' ({self.max_new_tokens})"
            )
        constraints = [n for n in ("regex", "json_schema", "choices") if getattr(self, n) is not None]
        if len(constraints) > 1:
            raise ValueError(f"give at most one of regex, json_schema, choices; got {', '.join(constraints)}")
        if self.regex is not None and not isinstance(self.regex, str):
            raise ValueError(f"sampling parameter 'regex' must be a string, got {type(self.regex).__name__}")
        if self.json_schema is not None and not isinstance(self.json_schema, (str, dict)):
            # pydantic classes are accepted too; the constraint layer turns them into a schema
            if not (isinstance(self.json_schema, type) and hasattr(self.json_schema, "model_json_schema")):
                raise ValueError("sampling parameter 'json_schema' must be a JSON string, a dict or a pydantic model")
        if self.choices is not None and (
            not isinstance(self.choices, list) or not self.choices or not all(isinstance(c, str) for c in self.choices)
        ):
            raise ValueError(f"sampling parameter 'choices' must be a non-empty list of strings, got {self.choices!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def has_constraint(self) -> bool:
        return any(v is not None for v in (self.regex, self.json_schema, self.choices, self.ebnf))


MAX_SAMPLES = 128
"""Most samples one prompt may ask for (``n``)."""
MAX_STOP_REGEX = 32
MAX_STOP_REGEX_LEN = 256
"""SGLang's bounds on ``stop_regex``: patterns per request and characters per pattern."""

REFUSED_SGLANG_FIELDS = {
    "beam_width": "beam search is not implemented",
    "structural_tag": "structural tags are not implemented; use json_schema or regex",
    "watermark": "watermarking is not implemented",
    "logit_bias": "logit_bias is not implemented",
}
"""SGLang sampling fields this engine cannot honour: refused (400) when set to a non-default value."""

SGLANG_INTERNAL_FIELDS = ("stop_strs", "stop_regex_strs", "stop_str_max_len", "stop_regex_max_len", "is_normalized",
                          "ebnf_full_assistant")
"""Fields of SGLang's ``SamplingParams`` its server fills itself: accepted at their default, refused otherwise."""


def _sglang_aliases(params: dict[str, Any]) -> dict[str, Any]:
    """SGLang spellings (and sglite's earlier ``lenient``) mapped to ours; SGLang-only fields refused by name when
    they would change the output."""
    params = dict(params)
    lenient = params.pop("lenient", None)  # sglite's earlier switch: lenient=false was the refusing default
    if lenient is not None:
        if not isinstance(lenient, bool):
            raise ValueError(f"sampling parameter 'lenient' must be a bool, got {lenient!r}")
        if params.get("strict") is not None and params["strict"] == lenient:
            raise ValueError("give one of 'strict' or 'lenient' (its earlier opposite), not both with one meaning")
        params["strict"] = not lenient
    sampling_seed = params.pop("sampling_seed", None)
    if sampling_seed is not None:
        if params.get("seed") not in (None, sampling_seed):
            raise ValueError("give one of 'seed' or 'sampling_seed' (SGLang's name), not two different values")
        params["seed"] = sampling_seed
    if params.get("beam_width") in (None, 1):
        params.pop("beam_width", None)
    for name in SGLANG_INTERNAL_FIELDS:  # SGLang's normalized copies of stop/ebnf: meaningless from a client
        value = params.pop(name, None)
        if value not in (None, False, 0, "", []):
            raise ValueError(f"sampling parameter {name!r} is SGLang-internal (derived from 'stop'/'ebnf'); give those instead")
    for name in ("structural_tag", "watermark", "logit_bias", "ebnf"):  # unset (None) means no such constraint
        if params.get(name) in (None, {}, ""):
            params.pop(name, None)
    refused = [name for name in REFUSED_SGLANG_FIELDS if name in params]
    if refused:
        raise ValueError(
            "; ".join(f"sampling parameter {name!r} is not supported: {REFUSED_SGLANG_FIELDS[name]}" for name in refused)
        )
    return params


def _check_stop_regex(patterns: Any) -> None:
    if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"sampling parameter 'stop_regex' must be a string or a list of non-empty strings, got {patterns!r}")
    if len(patterns) > MAX_STOP_REGEX:
        raise ValueError(f"sampling parameter 'stop_regex' allows at most {MAX_STOP_REGEX} patterns, got {len(patterns)}")
    for pattern in patterns:
        if len(pattern) > MAX_STOP_REGEX_LEN:
            raise ValueError(f"sampling parameter 'stop_regex': a pattern is {len(pattern)} characters, over {MAX_STOP_REGEX_LEN}")
        try:
            re.compile(pattern)
        except (re.error, OverflowError, RecursionError) as exc:  # a{4294967296} overflows instead of a re.error
            raise ValueError(f"sampling parameter 'stop_regex': {pattern!r} is not a valid regular expression ({exc})") from exc


def _check_int(sp: SamplingParams, name: str, low: int | None = None, high: int | None = None) -> None:
    value = getattr(sp, name)
    # Strict, as the OpenAI routes are: 1e18, 1.5 and "5" are refused, not coerced (a JSON float is not a count).
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"sampling parameter '{name}' must be an integer, got {value!r} ({type(value).__name__})")
    if low is not None and value < low:
        raise ValueError(f"sampling parameter '{name}' must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"sampling parameter '{name}' must be <= {high}, got {value}")


def _check_float(sp: SamplingParams, name: str, allowed: Range) -> None:
    low, high, low_open = allowed.low, allowed.high, allowed.low_open
    value = getattr(sp, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"sampling parameter '{name}' must be a finite number, got {value!r}")
    value = float(value)
    setattr(sp, name, value)
    if value < low or (low_open and value == low) or value > high:
        bound = f"> {low}" if low_open else f">= {low}"
        raise ValueError(f"sampling parameter '{name}' must be {bound} and <= {high}, got {value}")
