"""The outlines-core backend: every constraint becomes a regex, then a token-level DFA.

Selectable with ``grammar_backend="outlines"``. A regex DFA cannot express much of JSON Schema,
and outlines-core's schema -> regex step ignores several keywords, so ``audit_schema`` refuses
(by default: reports as relaxed, the finished output being checked against the full schema)
every keyword this route would not enforce, and refuses outright the shapes it would turn into
invalid JSON or an unbounded compile.

    >>> audit_schema({"type": "integer", "multipleOf": 7}, strict=True)
    Traceback (most recent call last):
    ...
    sglite.constraints.errors.ConstraintError: json_schema: 'multipleOf' at (root) is not enforced by the outlines backend; use grammar_backend='llguidance', remove it, or drop strict
    >>> audit_schema({"type": "integer", "multipleOf": 7}, strict=False)
    ["json_schema relaxed: 'multipleOf' at (root) is ignored by the outlines backend"]
"""

from __future__ import annotations

import re

from sglite.constraints.byte_cache import ByteLRU
from sglite.constraints.compiler import FSMCaches, compile_fsm, regex_for_choices
from sglite.constraints.errors import ConstraintError
from sglite.constraints.fsm_processor import FSMLogitsProcessor
from sglite.constraints.json_schema import normalize_schema, schema_to_regex
from sglite.constraints.limits import ConstraintLimits
from sglite.constraints.output_check import SchemaChecker
from sglite.constraints.schema_keywords import subschemas
from sglite.constraints.spec import ConstraintSpec
from sglite.constraints.vocabulary import get_vocabulary

# Keywords outlines-core's schema -> regex step drops (or, for oneOf, weakens to anyOf).
IGNORED_KEYWORDS = (
    "multipleOf", "uniqueItems", "minProperties", "maxProperties", "contains", "minContains", "maxContains",
    "propertyNames", "not", "if", "then", "else", "dependentRequired", "dependencies", "dependentSchemas",
    "unevaluatedProperties", "unevaluatedItems", "oneOf",
)
# A pattern that may match a quote, a backslash or a control character would put it raw into the JSON string.
_UNSAFE_PATTERN = re.compile(r"(?<!\\)\.|\[\^|\\[SWDsw]|\\p\{|\\P\{")


def audit_schema(schema, strict: bool) -> list[str]:
    """Warnings for what the outlines route relaxes, or (``strict``) ``ConstraintError`` for the first one."""
    warnings: list[str] = []

    def relax(keyword: str, pointer: str, why: str = "is ignored by the outlines backend") -> None:
        where = f"{keyword!r} at {pointer or '(root)'}"
        if strict:
            raise ConstraintError(
                f"json_schema: {where} is not enforced by the outlines backend; use grammar_backend='llguidance', "
                "remove it, or drop strict"
            )
        warnings.append(f"json_schema relaxed: {where} {why}")

    def refuse(keyword: str, pointer: str, why: str) -> None:
        raise ConstraintError(f"json_schema: {keyword!r} at {pointer or '(root)'} {why}; "
                              "use grammar_backend='llguidance' or change the schema")

    for pointer, node in subschemas(schema):
        for keyword in IGNORED_KEYWORDS:
            if keyword in node:
                relax(keyword, pointer)
        if "$ref" in node and isinstance(node["$ref"], str):
            target = node["$ref"]
            if target == "#" or (target.startswith("#/") and (pointer + "/").startswith(target[1:] + "/")):
                refuse("$ref", pointer, "is recursive, which a regex cannot express (outlines-core would expand it "
                       "without bound)")
        if "pattern" in node and isinstance(node["pattern"], str):
            if _UNSAFE_PATTERN.search(node["pattern"]):
                refuse("pattern", pointer, "may match a quote, backslash or control character, which the outlines "
                       "route would put into the JSON string unescaped")
            for keyword in ("minLength", "maxLength", "format"):
                if keyword in node:
                    relax(keyword, pointer, "is ignored next to 'pattern' by the outlines backend")
        if "format" in node and ("minLength" in node or "maxLength" in node) and "pattern" not in node:
            relax("minLength" if "minLength" in node else "maxLength", pointer,
                  "is ignored next to 'format' by the outlines backend")
        values = node["enum"] if isinstance(node.get("enum"), list) else [node["const"]] if "const" in node else None
        if values is not None and "type" in node:
            import jsonschema

            if any(not jsonschema.Draft202012Validator({"type": node["type"]}).is_valid(v) for v in values):
                refuse("type", pointer, "disagrees with a value of 'enum'/'const' next to it, and the outlines route "
                       "ignores 'type' there")
        properties = node.get("properties") if isinstance(node.get("properties"), dict) else {}
        if isinstance(node.get("required"), list):
            missing = [name for name in node["required"] if name not in properties]
            if missing:
                refuse("required", pointer, f"names {missing[0]!r}, which is not in 'properties' (the outlines route "
                       "cannot generate it)")
        if node.get("additionalProperties") in ({}, True) and node.get("type") == "object":
            refuse("additionalProperties", pointer, "allows any value, which the outlines route turns into invalid "
                   "JSON")
        if "allOf" in node and "additionalProperties" in node:
            refuse("allOf", pointer, "next to 'additionalProperties' is merged wrongly by the outlines route")
    return warnings


class OutlinesBackend:
    """Compiles ``ConstraintSpec``s to outlines-core FSMs over one tokenizer; owns its caches."""

    name = "outlines"

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids, limits: ConstraintLimits | None = None) -> None:
        self.limits = limits or ConstraintLimits()
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.vocabulary = get_vocabulary(tokenizer, eos_token_ids)
        self.caches = FSMCaches(self.limits.compiled_cache_bytes, self.limits.bias_cache_bytes,
                                self.limits.max_regex_size, self.limits.max_regex_length)
        self._schema_regexes: ByteLRU[str] = ByteLRU(self.limits.schema_cache_bytes)
        self._audits: ByteLRU[tuple[list[str], SchemaChecker]] = ByteLRU(self.limits.schema_cache_bytes)

    def regex(self, spec: ConstraintSpec) -> tuple[str, list[str]]:
        """The regex of ``spec`` and the relaxations it took."""
        if spec.kind == "regex":
            # Estimating a regex's automaton is Python work that grows with its text (~1 s for 10k characters
            # on a busy 2-core machine), and holds the GIL the step loop needs; past 2 characters per
            # state the budget could not be met by an ordinary regex anyway.
            if len(spec.source) > 2 * self.limits.max_regex_size:
                raise ConstraintError(
                    f"regex is {len(spec.source):,} characters, over the outlines backend's limit of "
                    f"{2 * self.limits.max_regex_size:,} (2 x SGLITE_MAX_REGEX_SIZE); use grammar_backend='llguidance' "
                    "or a shorter regex"
                )
            return spec.source, []
        if spec.kind == "choices":
            return regex_for_choices(spec.choices, max_bytes=self.limits.max_regex_size), []
        if spec.kind == "ebnf":
            raise ConstraintError("ebnf grammars need grammar_backend='llguidance' (the outlines backend is regex-only)")
        if spec.json_layout.indent is not None:
            raise ConstraintError("json_layout indent2/indent4 needs grammar_backend='llguidance'")
        if len(spec.source) > self.limits.max_schema_chars:
            raise ConstraintError(f"json_schema is {len(spec.source):,} characters, over the limit of "
                                  f"{self.limits.max_schema_chars:,}")
        audit = self._audits.get(spec.digest)
        if audit is None:
            schema = normalize_schema(spec.source)
            warnings = audit_schema(schema, spec.strict) if isinstance(schema, dict) else []
            audit = (warnings, SchemaChecker(schema))
            self._audits.put(spec.digest, audit, 4 * len(spec.source) + 64 + sum(len(w) for w in warnings))
        warnings = audit[0]
        regex = schema_to_regex(spec.source, json_layout=spec.json_layout, cache=self._schema_regexes,
                                max_regex_size=self.limits.max_regex_size)
        return regex, warnings

    def checker(self, spec: ConstraintSpec) -> SchemaChecker | None:
        """The validator of a JSON-schema ``spec``'s finished output (built by ``regex``); None for other kinds."""
        audit = self._audits.get(spec.digest) if spec.kind == "json_schema" else None
        return audit[1] if audit is not None else (SchemaChecker(normalize_schema(spec.source))
                                                   if spec.kind == "json_schema" else None)

    def processor(self, spec: ConstraintSpec, jump_forward: bool = True) -> FSMLogitsProcessor:
        regex, warnings = self.regex(spec)
        fsm = compile_fsm(regex, self.vocabulary, self.caches)
        proc = FSMLogitsProcessor(fsm, self.tokenizer, self.vocab_size, jump_forward=jump_forward)
        proc.warnings = tuple(warnings)
        proc.checker = self.checker(spec)
        return proc

    def cache_info(self) -> dict[str, dict[str, int]]:
        return {**self.caches.info(), "schema": self._schema_regexes.info()}

    def clear_caches(self) -> None:
        self.caches.clear()
        self._schema_regexes.clear()
        self._audits.clear()
