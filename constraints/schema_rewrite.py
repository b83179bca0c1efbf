"""A JSON schema rewritten into what the grammar compiler enforces exactly, plus what it must relax.

llguidance enforces most of JSON Schema; for the rest this module either rewrites the keyword
into an equivalent one it does enforce, or removes it and records a ``Relaxation`` (the output
is then checked against the full schema, ``output_check``):

- ``format``: the ones llguidance lacks become a ``pattern`` (``formats.PATTERN_FORMATS``).
- ``pattern`` / ``patternProperties``: ECMA regexes translated to Rust (``ecma_regex``);
  lookarounds and backreferences are relaxed.
- ``oneOf`` whose branches are provably exclusive (disjoint types, distinct ``const``/``enum``
  values of a property both require, a required key the other branch forbids) is an ``anyOf``;
  other ``oneOf``s are relaxed to ``anyOf``.
- ``dependentRequired`` / ``dependencies`` / ``dependentSchemas``: "key absent, or the rest
  present" as an ``anyOf``.
- ``not`` of ``{}``, of ``type``s and of ``required`` keys: ``false``, the complement types,
  the keys made absent. Other ``not``s are relaxed.
- A root referenced by ``$ref: "#"`` is copied under ``$defs`` and referenced there (llguidance
  refuses a cycle through a root with sibling keywords).

    >>> prepared = prepare_schema({"type": "string", "format": "json-pointer"})
    >>> prepared.schema["pattern"].startswith("^(?:"), prepared.relaxed
    (True, ())
    >>> [r.keyword for r in prepare_schema({"type": "string", "pattern": "^(?!x)"}).relaxed]
    ['pattern']
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from sglite.constraints.ecma_regex import to_rust
from sglite.constraints.formats import CHECKED_FORMATS, NATIVE_FORMATS, PATTERN_FORMATS
from sglite.constraints.schema_keywords import (
    ONE_SCHEMA,
    SCHEMA_LIST,
    SCHEMA_MAP,
    all_nodes,
    close_objects,
    escape_pointer,
)
from sglite.constraints.schema_refs import resolve_pointer

ROOT_NAME = "sglite_root"
MAX_DEPENDENCIES = 6
"""Most dependency rules enforced per object: each doubles the alternatives the grammar tracks."""
MAX_ENFORCED_BOUND = 1e15
"""Numeric bounds beyond this are checked on the output instead (a regex of the range is too large)."""
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
JSON_TYPES = ("null", "boolean", "object", "array", "number", "string", "integer")


@dataclass(frozen=True)
class Relaxation:
    """A keyword the grammar does not enforce; the output is checked against it afterwards."""

    keyword: str
    pointer: str
    reason: str

    def __str__(self) -> str:
        return f"{self.keyword!r} at {self.pointer or '(root)'} ({self.reason})"


@dataclass
class PreparedSchema:
    """The schema the grammar compiles, what was relaxed, and which keywords were rewritten (counts)."""

    schema: Any
    """What the grammar compiles (objects closed, keywords rewritten)."""
    original: Any
    """The schema as given (remote refs embedded): what the finished output is checked against."""
    relaxed: tuple[Relaxation, ...] = ()
    enforced: dict[str, int] = field(default_factory=dict)
    patterns: tuple[tuple[str, str, str, str], ...] = ()
    """``(keyword, JSON pointer, ECMA regex, Rust regex)`` of each pattern handed to the grammar."""


def prepare_schema(schema: Any, copy_root: bool = False, unsupported: frozenset[str] = frozenset()) -> PreparedSchema:
    """``schema`` (validated, refs checked) rewritten for the grammar; see the module docstring.

    A recursive root is moved under ``$defs``, or with ``copy_root`` copied there (llguidance
    accepts one or the other shape depending on where the cycle's sibling keywords sit). Patterns in
    ``unsupported`` (valid regexes the grammar's engine rejects) are relaxed."""
    if not isinstance(schema, dict):
        return PreparedSchema(schema, schema)
    closed = close_objects(schema)
    rewriter = _Rewriter(closed, unsupported)
    out = rewriter.walk(_lift_recursive_root(closed, copy_root), "")
    rewriter.walk_ref_targets(out)
    return PreparedSchema(out, schema, tuple(rewriter.relaxed), dict(rewriter.enforced), tuple(rewriter.patterns))


def _lift_recursive_root(schema: dict, copy_root: bool) -> dict:
    """The root moved under ``$defs`` when ``$ref: "#"`` recurses through it: llguidance refuses a
    cycle through a node with sibling keywords, so the new root holds only the ``$ref`` and the
    definitions (refs by the root's absolute ``$id`` become local ones)."""
    text = json.dumps(schema)
    base = schema.get("$id", schema.get("id"))
    base = base.split("#")[0] if isinstance(base, str) and base.split("#")[0] else None
    if '"$ref": "#"' not in text and not (base and f'"$ref": "{base}#' in text):
        return schema
    target = f"#/$defs/{ROOT_NAME}"

    def retarget(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key == "$ref" and isinstance(value, str):
                    if base and value.startswith(base + "#"):
                        value = value[len(base):]
                    out[key] = target if value in ("#", "#/") else value
                else:
                    out[key] = retarget(value)
            return out
        if isinstance(node, list):
            return [retarget(v) for v in node]
        return node

    moved = retarget(schema)
    body = {k: v for k, v in moved.items() if k not in ("$defs", "definitions", "$schema", "$id", "id")}
    if copy_root:
        return {**moved, "$defs": {**moved.get("$defs", {}), ROOT_NAME: body}}
    root = {k: moved[k] for k in ("definitions",) if k in moved}
    root["$defs"] = {**moved.get("$defs", {}), ROOT_NAME: body}
    root["$ref"] = target
    return root


def _canonical(value: Any) -> tuple[str, Any]:
    """JSON equality as JSON Schema defines it: ``1 == 1.0``, ``true != 1``."""
    if isinstance(value, bool) or value is None:
        return ("literal", value)
    if isinstance(value, (int, float)):
        return ("number", float(value))
    return ("json", json.dumps(value, sort_keys=True))


def _type_of(value: Any) -> set[str]:
    if value is None:
        return {"null"}
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, int):
        return {"integer", "number"}
    if isinstance(value, float):
        return {"number", "integer"} if value.is_integer() else {"number"}
    if isinstance(value, str):
        return {"string"}
    return {"array"} if isinstance(value, list) else {"object"}


class _Rewriter:
    def __init__(self, root: dict, unsupported: frozenset[str] = frozenset()) -> None:
        self.root = root
        self.unsupported = unsupported
        self.patterns: list[tuple[str, str, str, str]] = []
        self.relaxed: list[Relaxation] = []
        self.enforced: collections.Counter[str] = collections.Counter()
        self.visited: set[str] = set()

    def walk_ref_targets(self, root: dict) -> None:
        """Rewrite, in place, the schemas ``$ref``s reach outside schema positions (``#/definitions/a/full``)."""
        queue = [node["$ref"] for _, node in all_nodes(root) if isinstance(node.get("$ref"), str)]
        while queue:
            ref = queue.pop()
            if not ref.startswith("#/") or ref[1:] in self.visited:
                continue
            parent_pointer, _, last = ref[1:].rpartition("/")
            try:
                parent = resolve_pointer(root, parent_pointer)
                key = unquote(last).replace("~1", "/").replace("~0", "~")
                target = parent[int(key) if isinstance(parent, list) else key]
            except (KeyError, IndexError, ValueError, TypeError):
                self.visited.add(ref[1:])
                continue
            replaced = self.walk(target, ref[1:])
            parent[int(key) if isinstance(parent, list) else key] = replaced
            self.visited.add(ref[1:])
            queue.extend(node["$ref"] for _, node in all_nodes(replaced) if isinstance(node.get("$ref"), str))

    def relax(self, keyword: str, pointer: str, reason: str) -> None:
        lifted = f"/$defs/{ROOT_NAME}"
        if pointer == lifted or pointer.startswith(lifted + "/"):
            pointer = pointer[len(lifted):]  # the user's root, not its copy
        self.relaxed.append(Relaxation(keyword, pointer, reason))

    # ---- structure ----------------------------------------------------------------------------

    def walk(self, node: Any, pointer: str) -> Any:
        if not isinstance(node, dict):
            return node
        self.visited.add(pointer)
        out = dict(node)
        for key in ONE_SCHEMA:
            if isinstance(out.get(key), dict):
                out[key] = self.walk(out[key], f"{pointer}/{key}")
        for key in SCHEMA_LIST:
            if isinstance(out.get(key), list):
                out[key] = [self.walk(child, f"{pointer}/{key}/{i}") for i, child in enumerate(out[key])]
        for key in SCHEMA_MAP:
            if isinstance(out.get(key), dict):
                out[key] = {name: self.walk(child, f"{pointer}/{key}/{escape_pointer(name)}")
                            for name, child in out[key].items()}
        return self.rewrite(out, pointer)

    def rewrite(self, node: dict, pointer: str) -> Any:
        if "not" in node:
            node = self.rewrite_not(node, pointer)
            if node is False:
                return False
        if isinstance(node.get("format"), str):
            self.rewrite_format(node, pointer)
        if "pattern" in node:
            translated = self.translate(node["pattern"])
            if translated is None:
                del node["pattern"]
                self.relax("pattern", pointer, "a lookaround or backreference has no automaton")
            else:
                self.patterns.append(("pattern", pointer, node["pattern"], translated))
                self.enforced["pattern"] += translated != node["pattern"]
                node["pattern"] = translated
        for bound in _BOUNDS:
            value = node.get(bound)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) > MAX_ENFORCED_BOUND:
                del node[bound]  # llguidance builds a regex of the range: none for a 309-digit one
                self.relax(bound, pointer, f"|{bound}| over {MAX_ENFORCED_BOUND:.0e}")
        if isinstance(node.get("patternProperties"), dict):
            self.rewrite_pattern_properties(node, pointer)
        if isinstance(node.get("oneOf"), list):
            branches = node.pop("oneOf")
            if self.exclusive(branches, node):
                self.enforced["oneOf"] += 1
            else:
                self.relax("oneOf", pointer, "branches may overlap: generated as anyOf")
            self.add_any_of(node, branches)
        self.rewrite_dependencies(node, pointer)
        return node

    @staticmethod
    def add_any_of(node: dict, branches: list) -> None:
        if "anyOf" not in node:
            node["anyOf"] = branches
        else:
            node["allOf"] = [*node.get("allOf", []), {"anyOf": branches}]

    # ---- keywords -----------------------------------------------------------------------------

    def rewrite_format(self, node: dict, pointer: str) -> None:
        name = node["format"]
        if name in NATIVE_FORMATS:
            return
        if name not in PATTERN_FORMATS and name not in CHECKED_FORMATS or "string" not in (_types(node) or {"string"}):
            del node["format"]  # an annotation only (JSON Schema: unknown formats, and formats of non-strings)
            return
        if name in PATTERN_FORMATS and "pattern" not in node:
            node["pattern"] = f"^(?:{PATTERN_FORMATS[name]})$"
            del node["format"]
            self.enforced["format"] += 1
            return
        del node["format"]
        reason = "not a regular language" if name not in PATTERN_FORMATS else "combined with a pattern"
        self.relax("format", pointer, f"format {name!r}: {reason}")

    def translate(self, pattern: Any) -> str | None:
        return None if pattern in self.unsupported else to_rust(pattern)

    def rewrite_pattern_properties(self, node: dict, pointer: str) -> None:
        kept = {}
        for regex, child in node["patternProperties"].items():
            translated = self.translate(regex)
            if translated is not None:
                self.patterns.append(("patternProperties", f"{pointer}/patternProperties/{escape_pointer(regex)}",
                                      regex, translated))
                self.enforced["patternProperties"] += translated != regex
                kept[translated] = child
            elif node.get("additionalProperties") is not False:
                # Without it, matching keys fall to additionalProperties: looser unless that is false.
                self.relax("patternProperties", f"{pointer}/patternProperties/{escape_pointer(regex)}",
                           "a lookaround or backreference has no automaton")
        node["patternProperties"] = kept

    def rewrite_not(self, node: dict, pointer: str) -> Any:
        negated = node.pop("not")
        if negated is True or negated == {}:
            self.enforced["not"] += 1
            return False
        if negated is False:
            return node
        keys = set(negated)
        if keys == {"type"}:
            excluded = {negated["type"]} if isinstance(negated["type"], str) else set(negated["type"])
            if "number" in excluded:
                excluded.add("integer")
            current = node.get("type", list(JSON_TYPES))
            current = [current] if isinstance(current, str) else list(current)
            if "integer" in excluded and "number" in current and "number" not in excluded:
                self.relax("not", pointer, "not integer among numbers")
                return node
            remaining = [t for t in current if t not in excluded]
            if not remaining:
                return False
            node["type"] = remaining
            self.enforced["not"] += 1
            return node
        absent = self.absent_keys(negated)
        if absent is not None or self.all_absent_keys(negated) is not None:
            # `required` holds for every non-object, so its negation admits objects only.
            current = _types(node)
            if current is not None and "object" not in current:
                return False
            node["type"] = "object"
        if absent is not None:
            alternatives = [{"properties": {key: False}} for key in sorted(absent)]
            if len(alternatives) == 1:
                self.forbid(node, alternatives[0]["properties"])
            else:
                self.add_any_of(node, alternatives)
            self.enforced["not"] += 1
            return node
        forbidden = self.all_absent_keys(negated)
        if forbidden is not None:
            self.forbid(node, {key: False for key in forbidden})
            self.enforced["not"] += 1
            return node
        self.relax("not", pointer, "only not of {}, type and required is enforced")
        return node

    @staticmethod
    def forbid(node: dict, absent: dict) -> None:
        properties = dict(node.get("properties", {}))
        properties.update(absent)
        node["properties"] = properties

    @staticmethod
    def absent_keys(negated: Any) -> set[str] | None:
        """``not {"required": [a, b]}`` (or an allOf of such): one of the keys must be absent."""
        if not isinstance(negated, dict):
            return None
        if set(negated) == {"required"} and isinstance(negated["required"], list) and negated["required"]:
            return set(negated["required"])
        if set(negated) == {"allOf"} and isinstance(negated["allOf"], list):
            keys: set[str] = set()
            for member in negated["allOf"]:
                inner = _Rewriter.absent_keys(member)
                if inner is None:
                    return None
                keys |= inner
            return keys or None
        return None

    @staticmethod
    def all_absent_keys(negated: Any) -> list[str] | None:
        """``not {"anyOf": [{"required": [a]}, {"required": [b]}]}``: every key absent."""
        if not isinstance(negated, dict) or set(negated) != {"anyOf"} or not isinstance(negated["anyOf"], list):
            return None
        keys = []
        for member in negated["anyOf"]:
            if not (isinstance(member, dict) and set(member) == {"required"} and len(member["required"]) == 1):
                return None
            keys.append(member["required"][0])
        return keys

    def rewrite_dependencies(self, node: dict, pointer: str) -> None:
        rules: list[tuple[str, str, Any]] = []
        for keyword in ("dependentRequired", "dependentSchemas", "dependencies"):
            if isinstance(node.get(keyword), dict):
                rules.extend((keyword, name, value) for name, value in node.pop(keyword).items())
        for i, (keyword, name, value) in enumerate(rules):
            if i >= MAX_DEPENDENCIES:
                self.relax(keyword, pointer, f"more than {MAX_DEPENDENCIES} dependency rules in one object")
                continue
            if isinstance(value, list):
                present: Any = {"required": [name, *value]}
            elif value is True or value == {}:
                continue
            else:
                present = {"allOf": [{"required": [name]}, value]}
            node["allOf"] = [*node.get("allOf", []), {"anyOf": [{"properties": {name: False}}, present]}]
            self.enforced[keyword] += 1

    # ---- oneOf exclusivity --------------------------------------------------------------------

    def resolve(self, node: Any, depth: int = 0) -> Any:
        while isinstance(node, dict) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#") \
                and depth < 8:
            try:
                node = resolve_pointer(self.root, node["$ref"][1:])
            except KeyError:
                return node
            depth += 1
        return node

    def exclusive(self, branches: list, parent: dict) -> bool:
        """No instance (of ``parent``'s types) can match two ``branches``: a oneOf is then an anyOf."""
        resolved = [self.resolve(b) for b in branches]
        objects_only = _types(parent) == {"object"}
        return all(self.disjoint(resolved[i], resolved[j], objects_only)
                   for i in range(len(resolved)) for j in range(i + 1, len(resolved)))

    def disjoint(self, a: Any, b: Any, objects_only: bool = False) -> bool:
        if a is False or b is False:
            return True
        if not isinstance(a, dict) or not isinstance(b, dict):
            return False
        types_a, types_b = _types(a), _types(b)
        if types_a is not None and types_b is not None and not _overlap(types_a, types_b):
            return True
        values_a, values_b = _values(a), _values(b)
        if values_a is not None and values_b is not None:
            return not ({_canonical(v) for v in values_a} & {_canonical(v) for v in values_b})
        for values, types in ((values_a, types_b), (values_b, types_a)):
            if values is not None and types is not None and not any(_overlap(_type_of(v), types) for v in values):
                return True
        if not (objects_only or types_a == {"object"} or types_b == {"object"}):
            return False
        props_a, props_b = a.get("properties", {}), b.get("properties", {})
        required_a, required_b = set(a.get("required", [])), set(b.get("required", []))
        for key in set(props_a) & set(props_b) & required_a & required_b:
            if self.disjoint(self.resolve(props_a[key]), self.resolve(props_b[key])):
                return True
        return _forbids(b, required_a) or _forbids(a, required_b)


def _types(node: dict) -> set[str] | None:
    t = node.get("type")
    if isinstance(t, str):
        return {t}
    if isinstance(t, list):
        return set(t)
    return None


def _overlap(a: set[str], b: set[str]) -> bool:
    widen = lambda s: s | ({"integer"} if "number" in s else set())  # noqa: E731 - integer is a number
    return bool(widen(a) & widen(b)) or ("integer" in a and "number" in b) or ("number" in a and "integer" in b)


def _values(node: dict) -> list | None:
    if "const" in node:
        return [node["const"]]
    if isinstance(node.get("enum"), list):
        return node["enum"]
    return None


def _forbids(node: dict, keys: set[str]) -> bool:
    """``node`` accepts no object having any of ``keys``."""
    properties = node.get("properties", {})
    for key in keys:
        if properties.get(key) is False:
            return True
        if key not in properties and node.get("additionalProperties") is False and not node.get("patternProperties"):
            return True
    return False
