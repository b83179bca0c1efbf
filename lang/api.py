"""The public primitives of the language, SGLang-compatible: ``import sglite as sgl``.

    >>> import sglite as sgl
    >>> @sgl.function
    ... def classify(s, review):
    ...     s += sgl.user("Review: " + review + "\\nIs it positive?")
    ...     s += sgl.assistant(sgl.select("label", choices=["yes", "no"]))
    >>> sgl.set_default_backend(sgl.Runtime())              # doctest: +SKIP
    >>> classify.run(review="Great food!")["label"]         # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sglite.lang.backends.base import Backend, resolve_backend
from sglite.lang.choices import ChoicesSamplingMethod, token_length_normalized
from sglite.lang.ir import (
    Expr,
    ExprList,
    Gen,
    GenParams,
    Image,
    LangError,
    RoleBegin,
    RoleEnd,
    Select,
    SeparateReasoning,
    Video,
    as_expr,
    variable_names,
)
from sglite.lang.program import Program


def function(
    func: Callable[..., Any] | None = None, num_api_spec_tokens: int | None = None
) -> Program | Callable[[Callable[..., Any]], Program]:
    """Decorate a program: a function whose first parameter ``s`` is its ``ProgramState``.

    ``@sgl.function`` and ``@sgl.function()`` both work; ``num_api_spec_tokens`` (SGLang's API
    speculative execution) is accepted for compatibility and has no effect.
    """
    if func is None:
        return Program
    return Program(func)


def gen(
    name: str | None = None,
    max_tokens: int | None = None,
    min_tokens: int | None = None,
    n: int | None = None,
    stop: str | list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    stop_regex: str | list[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    return_logprob: bool | None = None,
    logprob_start_len: int | None = None,
    top_logprobs_num: int | None = None,
    return_text_in_logprobs: bool | None = None,
    dtype: type | str | None = None,
    choices: list[str] | None = None,
    choices_method: ChoicesSamplingMethod | None = None,
    regex: str | None = None,
    json_schema: str | dict | type | None = None,
    grammar: str | None = None,
) -> Gen | Select:
    """Generate into variable ``name``; unset arguments inherit ``run(...)``'s defaults.

    ``dtype`` (int/float/bool/str), ``regex``, ``json_schema`` (JSON string, dict or pydantic
    class) or ``grammar`` (a Lark or GBNF context-free grammar; the engine's ``ebnf``) constrain
    the output; ``choices`` makes this a ``select``.

        >>> s += "Age: " + sgl.gen("age", dtype=int)      # doctest: +SKIP

    ``n=k`` draws k samples from one prefill of the prompt: the variable is the list of k strings
    and the first is appended to the text (SGLang's shape); ``get_meta_info`` is the list of their
    meta infos. ``stop_regex`` stops at a regular-expression match (trimmed, like ``stop``).

        >>> s += "Slogan:" + sgl.gen("slogan", n=3, temperature=0.8, stop="\\n")   # doctest: +SKIP
        >>> s["slogan"]                     # three strings                    # doctest: +SKIP
    """
    if choices is not None:
        return select(name, choices, 0.0 if temperature is None else temperature,
                      choices_method or token_length_normalized)
    params = GenParams(
        max_new_tokens=max_tokens,
        min_new_tokens=min_tokens,
        stop=stop,
        stop_token_ids=stop_token_ids,
        stop_regex=stop_regex,
        n=n,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        ignore_eos=ignore_eos,
        return_logprob=return_logprob,
        logprob_start_len=logprob_start_len,
        top_logprobs_num=top_logprobs_num,
        return_text_in_logprobs=return_text_in_logprobs,
        dtype=dtype,
        regex=regex,
        json_schema=json_schema,
        grammar=grammar,
    )
    params.constraint()  # fail here, at the program line, on conflicting or unknown constraints
    params.sample_count()
    return Gen(name, params)


def gen_int(name: str | None = None, **kwargs: Any) -> Gen:
    """``gen(name, dtype=int, ...)``: an integer literal."""
    return gen(name, dtype=int, **kwargs)  # type: ignore[return-value]


def gen_string(name: str | None = None, **kwargs: Any) -> Gen:
    """``gen(name, dtype=str, ...)``: a double-quoted string literal."""
    return gen(name, dtype=str, **kwargs)  # type: ignore[return-value]


def select(
    name: str | None = None,
    choices: list[str] | None = None,
    temperature: float = 0.0,
    choices_method: ChoicesSamplingMethod = token_length_normalized,
) -> Select:
    """Append the choice the model finds most likely (scored in one batched call) into ``name``.

    Per-choice scores are in ``state.get_meta_info(name)["normalized_prompt_logprobs"]``.
    """
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise LangError(f"select() needs choices=[...] of non-empty strings, got {choices!r}")
    if not isinstance(choices_method, ChoicesSamplingMethod):
        raise LangError(f"choices_method must be e.g. sgl.token_length_normalized, got {choices_method!r}")
    return Select(name, list(choices), temperature, choices_method)


def image(expr: Any) -> Image:
    """An image input (SGLang's ``sgl.image``). Every model this engine serves is text-only, so running
    a program that uses it raises ``LangError`` naming the model; nothing is silently dropped."""
    return Image(expr)


def video(path: str, num_frames: int = 0) -> Video:
    """A video input (SGLang's ``sgl.video``); refused like ``image`` on a text-only model."""
    return Video(path, num_frames)


def separate_reasoning(expr: Expr | None = None, model_type: str | None = None) -> ExprList:
    """Split a reasoning model's ``<think>...</think>`` out of a ``gen``'s text (SGLang's ``separate_reasoning``).

    After ``s += sgl.assistant(sgl.separate_reasoning(sgl.gen("answer"), model_type="qwen3"))``
    ``s["answer"]`` holds the text after the reasoning and ``s["answer_reasoning_content"]`` the
    reasoning; the state's text keeps only the answer. ``model_type`` picks the markers
    (``reasoning_markers`` lists them).
    """
    from sglite.lang.reasoning import reasoning_markers

    if expr is None:
        raise LangError("separate_reasoning() needs the gen (or select) whose output to split")
    reasoning_markers(model_type)  # unknown model types fail here, at the program line
    if not variable_names(as_expr(expr)):
        raise LangError("separate_reasoning() needs a gen or select with a name")
    return ExprList([SeparateReasoning(as_expr(expr), model_type)])


def _role(role: str, expr: Expr | str | None) -> ExprList:
    middle = [] if expr is None else [as_expr(expr)]
    return ExprList([RoleBegin(role), *middle, RoleEnd(role)])


def system(expr: Expr | str | None = None) -> ExprList:
    """A system turn around ``expr``, rendered with the backend's chat template."""
    return _role("system", expr)


def user(expr: Expr | str | None = None) -> ExprList:
    """A user turn around ``expr``."""
    return _role("user", expr)


def assistant(expr: Expr | str | None = None) -> ExprList:
    """An assistant turn around ``expr`` (usually a ``gen``)."""
    return _role("assistant", expr)


def system_begin() -> RoleBegin:
    return RoleBegin("system")


def system_end() -> RoleEnd:
    return RoleEnd("system")


def user_begin() -> RoleBegin:
    return RoleBegin("user")


def user_end() -> RoleEnd:
    return RoleEnd("user")


def assistant_begin() -> RoleBegin:
    return RoleBegin("assistant")


def assistant_end() -> RoleEnd:
    return RoleEnd("assistant")


def flush_cache(backend: Backend | None = None) -> bool:
    """Empty the backend's prefix cache; returns whether it did."""
    return resolve_backend(backend).flush_cache()


def get_server_info(backend: Backend | None = None) -> dict[str, Any]:
    """What the backend reports about itself (model, cache statistics)."""
    return resolve_backend(backend).get_server_info()
