"""Bounds on what one constraint may cost, applied before any expensive step; owned by the engine.

    >>> ConstraintLimits().compiled_cache_bytes // (1 << 20)
    256
    >>> ConstraintLimits(max_regex_size=2000).max_regex_size
    2000

The engine builds its limits from ``EngineConfig`` (where ``SGLITE_MAX_REGEX_*`` are read, at engine start).
"""

from __future__ import annotations

from dataclasses import dataclass


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
    """outlines backend: largest estimated DFA size (``regex_budget``) a regex may have (``EngineConfig.max_regex_size``)."""
    max_regex_length: int = 100_000
    """outlines backend: longest regex text in characters (``EngineConfig.max_regex_length``)."""
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


