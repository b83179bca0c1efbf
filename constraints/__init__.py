"""Which tokens are allowed: regex, JSON-schema, pydantic, choice and grammar constraints.

An engine owns one grammar backend (``make_backend``): ``llguidance`` (the default; a lazily
built lexer plus Earley parser, so all of JSON Schema's structure and context-free grammars)
or ``outlines`` (outlines-core token DFAs from one regex). A per-request processor masks each
step's logits to the allowed tokens and, with jump-forward, appends text the constraint forces
without sampling it. Keywords a backend cannot enforce are refused with ``ConstraintError``
naming them, or relaxed with a ``ConstraintWarning`` in ``lenient`` mode.

    >>> from sglite.constraints import build_logits_processor, regex_for_choices
    >>> proc = build_logits_processor(tokenizer, vocab_size, json_schema={"type": "integer"})  # doctest: +SKIP
"""

from __future__ import annotations

from sglite.constraints.backend import BACKENDS, GrammarBackend, backend_processor, build_logits_processor, make_backend
from sglite.constraints.compiler import (
    BOOL_REGEX,
    FLOAT_REGEX,
    INT_REGEX,
    STRING_REGEX,
    CompiledFSM,
    FSMCaches,
    compile_fsm,
    regex_for_choices,
    regex_for_type,
)
from sglite.constraints.errors import ConstraintError, ConstraintWarning
from sglite.constraints.fsm_processor import FSMLogitsProcessor
from sglite.constraints.json_layout import COMPACT, FLEXIBLE, SPACED, JsonLayout
from sglite.constraints.json_schema import normalize_schema, schema_to_regex
from sglite.constraints.limits import ConstraintLimits
from sglite.constraints.regex_budget import MAX_REGEX_SIZE, check_regex_budget, regex_size
from sglite.constraints.spec import ConstraintSpec
from sglite.constraints.vocabulary import TokenVocabulary, get_vocabulary

__all__ = [
    "BACKENDS",
    "BOOL_REGEX",
    "COMPACT",
    "FLEXIBLE",
    "FLOAT_REGEX",
    "INT_REGEX",
    "MAX_REGEX_SIZE",
    "SPACED",
    "STRING_REGEX",
    "CompiledFSM",
    "ConstraintError",
    "ConstraintLimits",
    "ConstraintSpec",
    "ConstraintWarning",
    "FSMCaches",
    "FSMLogitsProcessor",
    "GrammarBackend",
    "JsonLayout",
    "TokenVocabulary",
    "backend_processor",
    "build_logits_processor",
    "check_regex_budget",
    "compile_fsm",
    "get_vocabulary",
    "make_backend",
    "normalize_schema",
    "regex_for_choices",
    "regex_for_type",
    "regex_size",
    "schema_to_regex",
]
