"""Which tokens are allowed: regex, JSON-schema, pydantic and choice constraints as token FSMs.

A constraint compiles (outlines-core) to a token-level automaton over the tokenizer's byte
vocabulary, unless its estimated size is over ``MAX_REGEX_SIZE`` (``regex_budget``); a
per-request processor masks each step's logits to the allowed tokens and, with jump-forward,
appends text the constraint forces without sampling it.

    >>> from sglite.constraints import build_logits_processor, regex_for_choices
    >>> proc = build_logits_processor(tokenizer, vocab_size, json_schema={"type": "integer"})  # doctest: +SKIP
"""

from __future__ import annotations

from sglite.constraints.compiler import (
    BOOL_REGEX,
    FLOAT_REGEX,
    INT_REGEX,
    STRING_REGEX,
    CompiledFSM,
    clear_compile_cache,
    compile_cache_info,
    compile_fsm,
    regex_for_choices,
    regex_for_type,
)
from sglite.constraints.errors import ConstraintError
from sglite.constraints.fsm_processor import FSMLogitsProcessor, build_logits_processor
from sglite.constraints.json_layout import COMPACT, FLEXIBLE, SPACED, JsonLayout
from sglite.constraints.json_schema import normalize_schema, schema_to_regex
from sglite.constraints.regex_budget import MAX_REGEX_SIZE, check_regex_budget, regex_size
from sglite.constraints.vocabulary import TokenVocabulary, get_vocabulary

__all__ = [
    "BOOL_REGEX",
    "FLOAT_REGEX",
    "INT_REGEX",
    "STRING_REGEX",
    "COMPACT",
    "CompiledFSM",
    "ConstraintError",
    "FLEXIBLE",
    "FSMLogitsProcessor",
    "JsonLayout",
    "MAX_REGEX_SIZE",
    "SPACED",
    "TokenVocabulary",
    "build_logits_processor",
    "check_regex_budget",
    "clear_compile_cache",
    "compile_cache_info",
    "compile_fsm",
    "get_vocabulary",
    "normalize_schema",
    "regex_for_choices",
    "regex_for_type",
    "regex_size",
    "schema_to_regex",
]
