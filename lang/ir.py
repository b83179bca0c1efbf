"""The program IR: small expression nodes a program appends to its state with ``s += ...``.

Nodes only describe *what* the program says; the interpreter (``interpreter.py``) decides
when to run them and a backend (``backends/``) decides where.

    >>> from sglite import gen
    >>> expr = "Q: 1+1=? A:" + gen("answer", max_tokens=4)
    >>> [type(node).__name__ for node in expr.items]
    ['ConstantText', 'Gen']
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from sglite.lang.choices import ChoicesSamplingMethod


class LangError(ValueError):
    """A program used the language incorrectly (the message says how to fix it)."""


@dataclass(frozen=True)
class GenParams:
    """Sampling parameters of one ``gen``; ``None`` means "inherit from ``run(...)``'s defaults".

    Names follow SGLang's ``sgl.gen``; ``to_sampling_params`` translates them to the engine's
    (``max_tokens`` -> ``max_new_tokens``).
    """

    max_new_tokens: int | None = None
    """At most this many new tokens (``max_tokens`` in ``gen``)."""
    min_new_tokens: int | None = None
    """EOS and stop strings are ignored until this many tokens exist (``min_tokens`` in ``gen``)."""
    stop: str | list[str] | None = None
    """Stop when the output ends with one of these strings (they are not included)."""
    stop_token_ids: list[int] | None = None
    """Stop after one of these token ids."""
    stop_regex: str | list[str] | None = None
    """Stop when the output matches one of these regular expressions (the match is trimmed)."""
    n: int | None = None
    """Samples of this ``gen`` (SGLang's ``n``): the variable becomes a list of ``n`` strings and the
    first is appended to the text; the prompt is prefilled once for all of them."""
    temperature: float | None = None
    """0 is greedy decoding."""
    top_p: float | None = None
    top_k: int | None = None
    """-1 keeps the whole vocabulary."""
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    ignore_eos: bool | None = None
    """Keep generating past EOS (until ``max_new_tokens``)."""
    return_logprob: bool | None = None
    """Record output token logprobs in the variable's meta info."""
    logprob_start_len: int | None = None
    """Also record prompt-token logprobs from this position on."""
    top_logprobs_num: int | None = None
    """Record this many top alternatives per output token."""
    return_text_in_logprobs: bool | None = None
    """Fill each logprob entry's third element with its token's text (else ``None``)."""
    dtype: type | str | None = None
    """``int``, ``float``, ``bool`` or ``str``: constrain the output to that literal's grammar."""
    regex: str | None = None
    """Constrain the output to match this regular expression."""
    json_schema: str | dict | type | None = None
    """Constrain the output to JSON valid for this schema (a JSON string, a dict or a pydantic model)."""
    grammar: str | None = None
    """Constrain the output to a context-free grammar (Lark, or GBNF with ``::=``); sent as ``ebnf``."""

    # Keys that travel as engine.generate arguments rather than inside sampling_params.
    REQUEST_KEYS: ClassVar[tuple[str, ...]] = (
        "return_logprob", "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs"
    )

    def merged_over(self, defaults: GenParams) -> GenParams:
        """These values where set, ``defaults`` elsewhere (how ``gen`` overrides ``run``)."""
        overrides = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        return dataclasses.replace(defaults, **overrides)

    def sample_count(self) -> int:
        """``n``, validated: a positive integer (1 when unset)."""
        n = 1 if self.n is None else self.n
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise LangError(f"gen(n=...) must be a positive integer, got {self.n!r}")
        return n

    def with_extra_stop(self, extra: tuple[str, ...]) -> GenParams:
        """Add a chat template's stop strings (e.g. ``<|im_end|>``) to the user's."""
        if not extra:
            return self
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return dataclasses.replace(self, stop=stop + [s for s in extra if s not in stop])

    def to_sampling_params(self) -> dict[str, Any]:
        """The engine's ``sampling_params`` dict (SGLang names), constraints resolved, unset keys left out."""
        params = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) is not None and f.name not in self.REQUEST_KEYS + ("dtype", "regex", "json_schema", "grammar")
        }
        if params.get("n") == 1:
            del params["n"]  # the engine's default: keeps requests valid for servers without ``n``
        if not params.get("stop_regex"):
            params.pop("stop_regex", None)
        regex, json_schema = self.constraint()
        if self.dtype is not None and dtype_name(self.dtype) in DTYPE_STOPS:
            # SGLang's int/float regexes allow trailing blanks and stop on them (the stop is trimmed)
            stop = [params["stop"]] if isinstance(params.get("stop"), str) else list(params.get("stop") or [])
            params["stop"] = stop + [s for s in DTYPE_STOPS[dtype_name(self.dtype)] if s not in stop]
        if regex is not None:
            params["regex"] = regex
        if json_schema is not None:
            params["json_schema"] = json_schema
        if self.grammar is not None:
            params["ebnf"] = self.grammar
        return params

    def constraint(self) -> tuple[str | None, str | None]:
        """``(regex, json_schema_string)``: at most one is set; ``dtype`` becomes a regex."""
        given = [n for n in ("dtype", "regex", "json_schema", "grammar") if getattr(self, n) is not None]
        if len(given) > 1:
            raise LangError(f"gen() takes at most one of dtype, regex, json_schema, grammar; got {', '.join(given)}")
        if self.dtype is not None:
            return dtype_regex(self.dtype), None
        if self.json_schema is not None:
            return None, json_schema_string(self.json_schema)
        return self.regex, None

    def request_options(self) -> dict[str, Any]:
        """``return_logprob``/``logprob_start_len``/``top_logprobs_num``/``return_text_in_logprobs``
        with the engine's defaults."""
        top = self.top_logprobs_num or 0
        return {
            "return_logprob": bool(self.return_logprob) or top > 0,
            "logprob_start_len": -1 if self.logprob_start_len is None else self.logprob_start_len,
            "top_logprobs_num": top,
            "return_text_in_logprobs": bool(self.return_text_in_logprobs),
        }


REGEX_INT = r"[-+]?[0-9]+[ \n]*"
REGEX_FLOAT = r"[-+]?[0-9]*\.?[0-9]+[ \n]*"
"""SGLang's ``dtype=int`` / ``dtype=float`` regexes (``sglang.lang.ir``), with ``DTYPE_STOPS`` as its stops."""
DTYPE_STOPS = {"int": (" ", "\n"), "float": (" ", "\n")}


def dtype_name(dtype: type | str) -> str:
    return dtype if isinstance(dtype, str) else getattr(dtype, "__name__", repr(dtype))


def dtype_regex(dtype: type | str) -> str:
    """The regex of a Python literal type: ``int``, ``float``, ``bool`` or ``str`` (or their names).

    ``int`` and ``float`` are SGLang's (a number, then blanks the stops trim); ``bool`` is ``True|False``
    and ``str`` a double-quoted JSON string.

        >>> import re
        >>> bool(re.fullmatch(dtype_regex(int), "+365 ")), bool(re.fullmatch(dtype_regex("float"), "3.14"))
        (True, True)
    """
    from sglite import constraints

    table = {
        "int": REGEX_INT,
        "float": REGEX_FLOAT,
        "bool": constraints.BOOL_REGEX,
        "str": constraints.STRING_REGEX,
    }
    name = dtype_name(dtype)
    if name not in table:
        raise LangError(f"gen(dtype=...) must be one of int, float, bool, str; got {dtype!r}")
    return table[name]


def json_schema_string(schema: str | dict | type) -> str:
    """A JSON schema as a string, from a string, a dict or a pydantic model class."""
    if isinstance(schema, str):
        return schema
    if isinstance(schema, dict):
        return json.dumps(schema)
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        return json.dumps(schema.model_json_schema())
    raise LangError(f"json_schema must be a JSON string, a dict or a pydantic model class; got {type(schema).__name__}")


class Expr:
    """Base of every node; ``+`` concatenates nodes (and strings) into an ``ExprList``."""

    def __add__(self, other: Expr | str) -> ExprList:
        return ExprList.concat(self, as_expr(other))

    def __radd__(self, other: Expr | str) -> ExprList:
        return ExprList.concat(as_expr(other), self)


def as_expr(value: Expr | str) -> Expr:
    """Strings become constant text; anything else that is not a node is a mistake worth naming."""
    if isinstance(value, Expr):
        return value
    if isinstance(value, str):
        return ConstantText(value)
    if value is None:
        raise LangError("cannot append None to a program state (did a helper forget to return its expression?)")
    raise LangError(f"cannot append a {type(value).__name__} to a program state; convert it with str(...) first")


@dataclass(eq=False)
class ExprList(Expr):
    """A sequence of nodes run in order."""

    items: list[Expr] = field(default_factory=list)

    @staticmethod
    def concat(left: Expr, right: Expr) -> ExprList:
        items = left.items if isinstance(left, ExprList) else [left]
        more = right.items if isinstance(right, ExprList) else [right]
        return ExprList(items + more)


@dataclass(eq=False)
class ConstantText(Expr):
    """Literal text appended to the prompt."""

    value: str


@dataclass(eq=False)
class Gen(Expr):
    """Generate text from the model into variable ``name`` (``None``: keep it only in the text)."""

    name: str | None
    params: GenParams


@dataclass(eq=False)
class Select(Expr):
    """Append the most likely of ``choices`` and store it in ``name``."""

    name: str | None
    choices: list[str]
    temperature: float
    choices_method: ChoicesSamplingMethod


@dataclass(eq=False)
class RoleBegin(Expr):
    """Open a chat turn: the chat template's prefix for ``role`` is appended."""

    role: str


@dataclass(eq=False)
class RoleEnd(Expr):
    """Close the open chat turn: its text becomes a message and the template's suffix is appended."""

    role: str


@dataclass(eq=False)
class Image(Expr):
    """An image input; refused when run (every model served here is text-only)."""

    source: Any


@dataclass(eq=False)
class Video(Expr):
    """A video input; refused when run (every model served here is text-only)."""

    path: str
    num_frames: int


@dataclass(eq=False)
class SeparateReasoning(Expr):
    """Run ``inner`` (gens/selects), then split each of its variables ``x`` into the reasoning
    (``x_reasoning_content``) and the rest (``x``); readers see only the split values."""

    inner: Expr
    model_type: str | None

    @staticmethod
    def reasoning_name(name: str) -> str:
        return f"{name}_reasoning_content"


@dataclass(eq=False)
class VarScopeBegin(Expr):
    """Start capturing all text appended from here into variable ``name``."""

    name: str


@dataclass(eq=False)
class VarScopeEnd(Expr):
    """Stop capturing into ``name``."""

    name: str


@dataclass(eq=False)
class ConcatenateAndAppend(Expr):
    """Append what each forked state wrote after the fork point (``join("concate_and_append")``)."""

    executors: list[Any]


def variable_names(expr: Expr) -> list[str]:
    """Names of the variables a node (or list of nodes) will define, in order."""
    if isinstance(expr, ExprList):
        return [name for item in expr.items for name in variable_names(item)]
    if isinstance(expr, (Gen, Select)) and expr.name is not None:
        return [expr.name]
    if isinstance(expr, VarScopeEnd):
        return [expr.name]
    if isinstance(expr, SeparateReasoning):
        inner = variable_names(expr.inner)
        return inner + [SeparateReasoning.reasoning_name(name) for name in inner]
    return []
