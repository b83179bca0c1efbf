"""Where keywords sit in a JSON schema: JSON pointers for error messages and relaxation warnings.

A backend that refuses (or, in lenient mode, relaxes) a keyword says which; this module finds
every subschema using it so the message names the exact place to change.

    >>> schema = {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}
    >>> keyword_pointers(schema, "uniqueItems")
    ['/properties/tags']
    >>> keywords_in_message('Unimplemented keys: ["if", "then"]')
    ['if', 'then']
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterator

# Keywords whose value is one subschema, a list of subschemas, or a name -> subschema map (all drafts).
ONE_SCHEMA = ("items", "additionalItems", "additionalProperties", "not", "if", "then", "else", "contains",
              "propertyNames", "unevaluatedItems", "unevaluatedProperties", "contentSchema")
SCHEMA_LIST = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
SCHEMA_MAP = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas", "dependencies")

_KEY_LIST = re.compile(r"Unimplemented keys: (\[[^\]]*\])")


def escape_pointer(name: str) -> str:
    """One JSON-pointer segment: ``~`` -> ``~0``, ``/`` -> ``~1``."""
    return str(name).replace("~", "~0").replace("/", "~1")


def subschemas(node: Any, pointer: str = "") -> Iterator[tuple[str, dict]]:
    """``(JSON pointer, subschema)`` of ``node`` and every schema inside it, depth first."""
    if not isinstance(node, dict):
        return
    yield pointer, node
    for key in ONE_SCHEMA:
        if isinstance(node.get(key), dict):
            yield from subschemas(node[key], f"{pointer}/{key}")
    for key in SCHEMA_LIST:
        if isinstance(node.get(key), list):
            for i, child in enumerate(node[key]):
                yield from subschemas(child, f"{pointer}/{key}/{i}")
    for key in SCHEMA_MAP:
        if isinstance(node.get(key), dict):
            for name, child in node[key].items():
                yield from subschemas(child, f"{pointer}/{key}/{escape_pointer(name)}")


DATA_KEYWORDS = ("enum", "const", "default", "examples", "example")
"""Keywords whose values are JSON data, never schemas."""


def all_nodes(node: Any, pointer: str = "") -> Iterator[tuple[str, dict]]:
    """``(JSON pointer, object)`` of every JSON object in ``node`` outside data keywords: unlike
    ``subschemas`` it also reaches schemas a ``$ref`` finds in plain containers (``#/definitions/a/full``)."""
    if isinstance(node, dict):
        yield pointer, node
        for key, value in node.items():
            if key not in DATA_KEYWORDS and isinstance(value, (dict, list)):
                yield from all_nodes(value, f"{pointer}/{escape_pointer(key)}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from all_nodes(value, f"{pointer}/{i}")


def keyword_pointers(schema: Any, keyword: str) -> list[str]:
    """JSON pointers of the subschemas that use ``keyword`` (``""`` is the root)."""
    return [pointer for pointer, node in subschemas(schema) if keyword in node]


def keywords_in_message(message: str) -> list[str]:
    """The keywords a backend message names (llguidance: ``Unimplemented keys: ["a", "b"]``; ``oneOf``)."""
    match = _KEY_LIST.search(message)
    if match:
        try:
            return [str(k) for k in json.loads(match.group(1))]
        except ValueError:
            return []
    if "oneOf" in message:
        return ["oneOf"]
    match = re.search(r"Unknown format: (\S+)", message)
    if match:
        return ["format"]
    return []


def describe(schema: Any, message: str) -> str:
    """``message`` with each keyword it names located: ``'uniqueItems' at /properties/tags``."""
    located = []
    unknown_format = re.search(r"Unknown format: (\S+)", message)
    for keyword in keywords_in_message(message):
        pointers = keyword_pointers(schema, keyword)
        if unknown_format and keyword == "format":
            pointers = [p for p, node in subschemas(schema) if node.get("format") == unknown_format.group(1)]
        if pointers:
            shown = ", ".join(p or "(root)" for p in pointers[:5]) + (" ..." if len(pointers) > 5 else "")
            located.append(f"{keyword!r} at {shown}")
        else:
            located.append(repr(keyword))
    first_line = message.strip().splitlines()[0] if message.strip() else message
    return f"{'; '.join(located)} ({first_line})" if located else first_line


def close_objects(schema: Any) -> Any:
    """A copy of ``schema`` where an object schema listing ``properties`` but saying nothing about
    others gets ``additionalProperties: false`` (as xgrammar's and Outlines' strict modes do).

    Every output stays valid under the original schema; without it a model may append invented
    keys until it runs out of tokens. Left open: objects whose ``required`` names something not
    in ``properties``, that use ``patternProperties``/``unevaluatedProperties``/``allOf``, and any
    schema an ``allOf`` combines (closing those would make the intersection reject listed keys).

        >>> close_objects({"type": "object", "properties": {"a": {}}})["additionalProperties"]
        False
        >>> "additionalProperties" in close_objects({"allOf": [{"properties": {"a": {}}}]})["allOf"][0]
        False
    """
    in_all_of: set[str] = set()
    refs_in_all_of: set[str] = set()
    for pointer, node in subschemas(schema):
        if isinstance(node.get("allOf"), list):
            for i, member in enumerate(node["allOf"]):
                for inner_pointer, inner in subschemas(member, f"{pointer}/allOf/{i}"):
                    in_all_of.add(inner_pointer)
                    if isinstance(inner.get("$ref"), str) and inner["$ref"].startswith("#"):
                        refs_in_all_of.add(inner["$ref"][1:])

    def walk(node: Any, pointer: str) -> Any:
        if not isinstance(node, dict):
            return node
        out = dict(node)
        for key in ONE_SCHEMA:
            if isinstance(out.get(key), dict):
                out[key] = walk(out[key], f"{pointer}/{key}")
        for key in SCHEMA_LIST:
            if isinstance(out.get(key), list):
                out[key] = [walk(child, f"{pointer}/{key}/{i}") for i, child in enumerate(out[key])]
        for key in SCHEMA_MAP:
            if isinstance(out.get(key), dict):
                out[key] = {name: walk(child, f"{pointer}/{key}/{escape_pointer(name)}") for name, child in out[key].items()}
        properties = out.get("properties")
        required = out.get("required") if isinstance(out.get("required"), list) else []
        if (isinstance(properties, dict) and not any(k in out for k in (
                "additionalProperties", "patternProperties", "unevaluatedProperties", "allOf", "$ref"))
                and all(name in properties for name in required)
                and pointer not in in_all_of and not any(pointer.startswith(r) for r in refs_in_all_of if r)):
            out["additionalProperties"] = False
        return out

    return walk(schema, "")
