"""Choosing a grammar backend, and the one entry point that turns request parameters into a processor.

An engine owns one backend (``make_backend``): the tokenizer view, the compiled-constraint
cache and the logit-bias cache live in it, bounded in bytes, so two engines in one process
share nothing. ``llguidance`` (the default) enforces all of JSON Schema it reports no warning
for, plus context-free grammars; ``outlines`` compiles everything to one regex DFA.

    >>> backend = make_backend("llguidance", tokenizer, vocab_size, {tokenizer.eos_token_id})  # doctest: +SKIP
    >>> proc = backend_processor(backend, json_schema={"type": "integer", "multipleOf": 7})     # doctest: +SKIP
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from typing import Any, Protocol

from sglite.constraints.errors import ConstraintError, ConstraintWarning
from sglite.constraints.limits import ConstraintLimits
from sglite.constraints.spec import ConstraintSpec

logger = logging.getLogger(__name__)

BACKENDS = ("llguidance", "outlines")
"""Names ``grammar_backend`` accepts."""


class GrammarBackend(Protocol):
    """What the engine needs of a backend."""

    name: str

    def processor(self, spec: ConstraintSpec, jump_forward: bool = True) -> Any: ...

    def cache_info(self) -> dict[str, dict[str, int]]: ...

    def clear_caches(self) -> None: ...


def make_backend(name: str, tokenizer, vocab_size: int, eos_token_ids: Iterable[int] | None = None,
                 limits: ConstraintLimits | None = None) -> GrammarBackend:
    """A fresh backend over ``tokenizer`` (builds its vocabulary view: ~1 s for 50k tokens)."""
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ConstraintError(f"vocab_size must be a positive int, got {vocab_size!r}")
    eos = set(eos_token_ids or ())
    if name == "llguidance":
        from sglite.constraints.guidance_backend import GuidanceBackend

        return GuidanceBackend(tokenizer, vocab_size, eos, limits)
    if name == "outlines":
        from sglite.constraints.outlines_backend import OutlinesBackend

        return OutlinesBackend(tokenizer, vocab_size, eos, limits)
    raise ConstraintError(f"grammar_backend must be one of {', '.join(BACKENDS)}, got {name!r}")


def backend_processor(backend: GrammarBackend, *, jump_forward: bool = True, **params: Any):
    """A fresh per-request processor for ``regex`` / ``json_schema`` / ``choices`` / ``ebnf`` (plus
    ``json_layout``, ``whitespace_pattern``, ``strict``); relaxations are warned (``ConstraintWarning``)
    and logged, so the caller sees them."""
    try:
        spec = ConstraintSpec.from_params(**params)
        proc = backend.processor(spec, jump_forward=jump_forward)
    except ConstraintError as exc:
        exc.param = exc.param or _kind(params)
        raise
    except (RecursionError, OverflowError, MemoryError) as exc:
        # Python's own parsers give up this way on a deeply nested or huge input: the input is at fault.
        raise _field_error(params, f"{_kind(params)} cannot be compiled: {_crash_reason(exc)}") from exc
    except Exception as exc:
        # Any other failure while compiling client input is still the client's 400, never a 500; the
        # traceback is logged in case it is a bug of ours.
        logger.warning("compiling a %s failed", _kind(params), exc_info=True)
        raise _field_error(params, f"{_kind(params)} cannot be compiled: {type(exc).__name__}: {str(exc)[:300]}") from exc
    for message in getattr(proc, "warnings", ()):
        logger.warning("%s", message)
        warnings.warn(message, ConstraintWarning, stacklevel=3)
    return proc


def _kind(params: dict[str, Any]) -> str:
    """The constraint field a request set (``regex``, ``json_schema``...), to name it in an error."""
    return next((name for name in ("regex", "json_schema", "choices", "ebnf") if params.get(name) is not None), "constraint")


def _field_error(params: dict[str, Any], message: str) -> ConstraintError:
    error = ConstraintError(message)
    error.param = _kind(params)
    return error


def _crash_reason(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "it is nested too deeply (reduce the nesting of groups, brackets or objects)"
    if isinstance(exc, MemoryError):
        return "it needs more memory than this server allows for a constraint"
    return f"a number in it is too large ({exc})"


def build_logits_processor(
    tokenizer,
    vocab_size: int,
    *,
    regex: str | None = None,
    json_schema: Any = None,
    choices: list[str] | None = None,
    ebnf: str | None = None,
    whitespace_pattern: str | None = None,
    json_layout: Any = None,
    strict: bool = False,
    jump_forward: bool = True,
    eos_token_ids: Iterable[int] | None = None,
    backend: str | GrammarBackend = "llguidance",
):
    """A processor constraining output to exactly one of ``regex``, ``json_schema``, ``choices``, ``ebnf``.

    ``backend`` is a backend object (reused, with its caches) or a name (a fresh backend for this
    call: fine for tests and scripts, wasteful per request). ``vocab_size`` is the model's logits
    width; ``eos_token_ids`` adds stop ids beyond ``tokenizer.eos_token_id``. Raises
    ``ConstraintError`` (a ``ValueError``) naming the problem.

        >>> proc = build_logits_processor(tok, 2048, choices=["yes", "no"])  # doctest: +SKIP
    """
    if isinstance(backend, str):
        backend = make_backend(backend, tokenizer, vocab_size, eos_token_ids)
    return backend_processor(backend, jump_forward=jump_forward, regex=regex, json_schema=json_schema,
                             choices=choices, ebnf=ebnf, whitespace_pattern=whitespace_pattern,
                             json_layout=json_layout, strict=strict)
