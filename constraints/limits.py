"""Bounds on what one constraint may cost, applied before any expensive step; owned by the engine.

    >>> ConstraintLimits().compiled_cache_bytes // (1 << 20)
    256
    >>> ConstraintLimits.from_env({"SGLITE_MAX_REGEX_SIZE": "2000"}).max_regex_size
    2000
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from sglite.constraints.errors import ConstraintError


@dataclass(frozen=True)
class ConstraintLimits:
    """Size limits and cache budgets of one engine's constraint backend."""

    compiled_cache_bytes: int = 256 << 20
    """Budget of the compiled-constraint cache (outlines-core indexes are charged their transitions,
    llguidance grammars an estimate from the grammar text)."""
    bias_cache_bytes: int = 256 << 20
    """Budget of cached per-state 0/-inf logit rows (4 bytes a token in float32)."""
    schema_cache_bytes: int = 32 << 20
    """Budget of cached schema -> regex translations (outlines backend)."""
    max_regex_size: int = 8_000
    """outlines backend: largest estimated DFA size (``regex_budget``) a regex may have (env ``SGLITE_MAX_REGEX_SIZE``)."""
    max_regex_length: int = 100_000
    """outlines backend: longest regex text in characters (env ``SGLITE_MAX_REGEX_LENGTH``)."""
    max_regex_chars: int = 1_000_000
    """llguidance backend: longest regex text (its lexer is built lazily, so length is cheap)."""
    max_choices_bytes: int = 1_000_000
    """llguidance backend: most bytes over all ``choices`` (the outlines backend uses ``max_regex_size``)."""
    max_schema_chars: int = 1_000_000
    """Longest JSON schema text."""
    max_grammar_chars: int = 1_000_000
    """Longest ``ebnf`` grammar text."""
    max_grammar_size: int = 500_000
    """llguidance's ``max_grammar_size`` parser limit (symbols after compiling a schema or grammar)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ConstraintLimits:
        """Defaults, with ``SGLITE_MAX_REGEX_SIZE`` / ``SGLITE_MAX_REGEX_LENGTH`` from ``environ`` when set."""
        values = {}
        for env, name in (("SGLITE_MAX_REGEX_SIZE", "max_regex_size"), ("SGLITE_MAX_REGEX_LENGTH", "max_regex_length")):
            if env in environ:
                try:
                    values[name] = int(environ[env])
                except ValueError:
                    raise ConstraintError(f"environment variable {env}={environ[env]!r} must be an integer") from None
        return dataclasses.replace(cls(), **values)
