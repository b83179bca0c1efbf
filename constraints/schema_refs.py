"""``$ref``s of a JSON schema: every one resolved before compiling, or a precise error.

Local refs (``#/definitions/x``, ``#``) must point at something in the schema. References to the
JSON Schema meta-schemas (``http://json-schema.org/draft-04/schema#/definitions/positiveInteger``,
common in OpenAPI/Swagger schemas) are resolved offline from ``jsonschema_specifications`` and
embedded under ``$defs``, so the grammar compiler sees only local refs. Any other remote ref
cannot be fetched (the server never goes to the network for a request) and is refused, naming it.

    >>> schema = {"properties": {"n": {"$ref": "http://json-schema.org/draft-04/schema#/definitions/positiveInteger"}}}
    >>> embed_remote_refs(schema)["properties"]["n"]
    {'$ref': '#/$defs/sglite_remote0'}
    >>> check_local_refs({"$ref": "#/definitions/missing"})
    Traceback (most recent call last):
    ...
    sglite.constraints.errors.ConstraintError: json_schema: '$ref' at (root) points at '#/definitions/missing', which does not exist in the schema
"""

from __future__ import annotations

import functools
from typing import Any
from urllib.parse import unquote

from sglite.constraints.errors import ConstraintError
from sglite.constraints.schema_keywords import all_nodes, subschemas

EMBEDDED_PREFIX = "sglite_remote"


@functools.cache
def _meta_schemas() -> dict[str, Any]:
    """Meta-schemas by URL without trailing ``#`` (``http://json-schema.org/draft-07/schema``)."""
    import jsonschema_specifications

    return {uri.rstrip("#"): resource.contents for uri, resource in jsonschema_specifications.REGISTRY.items()}


def _base_uri(schema: Any) -> str:
    if not isinstance(schema, dict):
        return ""
    base = schema.get("$id", schema.get("id", ""))
    return base.split("#")[0] if isinstance(base, str) else ""


def embed_remote_refs(schema: Any) -> Any:
    """``schema`` with refs into the JSON Schema meta-schemas embedded under ``$defs`` (a copy if any):
    each referenced fragment once, with the refs inside it embedded the same way."""
    if not isinstance(schema, dict):
        return schema
    base = _base_uri(schema)
    embedded: dict[tuple[str, str], str] = {}
    defs: dict[str, Any] = {}

    def embed(document: str, fragment: str) -> str:
        key = (document, fragment)
        if key not in embedded:
            embedded[key] = name = f"{EMBEDDED_PREFIX}{len(embedded)}"
            try:
                target = resolve_pointer(_meta_schemas()[document], fragment)
            except KeyError:
                raise ConstraintError(f"json_schema: '$ref' {document}#{fragment} does not exist in that meta-schema") from None
            defs[name] = walk(target, document)
        return f"#/$defs/{embedded[key]}"

    def walk(node: Any, document: str | None) -> Any:
        if isinstance(node, dict):
            out = {key: walk(value, document) for key, value in node.items()
                   if not (document and key in ("$id", "id", "$schema"))}
            ref = out.get("$ref")
            if isinstance(ref, str):
                target_document, _, fragment = ref.partition("#")
                if not target_document and document:  # a ref inside an embedded meta-schema
                    out["$ref"] = embed(document, fragment)
                elif target_document and target_document != base and target_document.rstrip("#") in _meta_schemas():
                    out["$ref"] = embed(target_document.rstrip("#"), fragment)
            return out
        if isinstance(node, list):
            return [walk(item, document) for item in node]
        return node

    out = walk(schema, None)
    if not defs:
        return schema
    out["$defs"] = {**(out.get("$defs") if isinstance(out.get("$defs"), dict) else {}), **defs}
    return out


def resolve_pointer(schema: Any, fragment: str) -> Any:
    """The node at JSON pointer ``fragment`` (``/definitions/a~1b``, percent-encoded or not); KeyError if none."""
    node = schema
    if fragment in ("", "/"):
        return node
    if not fragment.startswith("/"):
        raise KeyError(fragment)  # an anchor name ("#foo"): resolved by the compiler, not here
    for part in fragment[1:].split("/"):
        part = unquote(part).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(fragment)
    return node


def check_local_refs(schema: Any) -> None:
    """Raise ``ConstraintError`` naming the first ``$ref`` that resolves nowhere (keyword and pointer)."""
    base = _base_uri(schema)
    nodes = list(all_nodes(schema))
    anchors = {node.get("$anchor") for _, node in nodes if isinstance(node.get("$anchor"), str)}
    anchors |= {node[key][1:] for _, node in nodes for key in ("id", "$id")
                if isinstance(node.get(key), str) and node[key].startswith("#")}  # draft-04/06 plain-name ids
    ids = {node[key] for _, node in nodes for key in ("$id", "id") if isinstance(node.get(key), str)}
    for pointer, node in nodes:
        ref = node.get("$ref")
        if not isinstance(ref, str):
            continue
        document, hashed, fragment = ref.partition("#")
        if document and document != base and ref not in ids and document not in ids:
            raise ConstraintError(
                f"json_schema: '$ref' at {pointer or '(root)'} points at {ref!r}, outside the schema; "
                "remote references are not fetched: inline the referenced schema under $defs"
            )
        if document and document != base:
            continue  # an embedded $id: the compiler resolves it
        if fragment and not fragment.startswith("/"):
            if fragment not in anchors:
                raise ConstraintError(f"json_schema: '$ref' at {pointer or '(root)'} names anchor {fragment!r}, "
                                      "which no $anchor in the schema defines")
            continue
        try:
            resolve_pointer(schema, fragment)
        except KeyError:
            raise ConstraintError(
                f"json_schema: '$ref' at {pointer or '(root)'} points at {ref!r}, which does not exist in the schema"
            ) from None


def check_recursion_terminates(schema: Any) -> None:
    """Raise ``ConstraintError`` when ``schema`` admits no finite document because a ``$ref`` cycle has
    no way out (every instance would contain itself), naming the ``$ref`` that closes the cycle.

    A least fixpoint over the local refs: a ref is productive once its target can be finished with
    refs already known productive (optional properties left out, arrays left empty).

        >>> check_recursion_terminates({"properties": {"next": {"$ref": "#"}}})  # optional: ends
        >>> check_recursion_terminates({"properties": {"next": {"$ref": "#"}}, "required": ["next"]})
        Traceback (most recent call last):
        ...
        sglite.constraints.errors.ConstraintError: json_schema: the recursive '$ref' at /properties/next has no base case: every document would contain itself forever; make the recursion optional (not required, minItems 0, or an anyOf branch without it)
    """
    if not isinstance(schema, dict) or '"$ref"' not in _dumps(schema):
        return
    productive: dict[str, bool] = {}
    assume_all = [True]  # first pass: every ref productive, so only recursion can make the answer False
    refs: list[tuple[str, str]] = [(pointer, node["$ref"]) for pointer, node in all_nodes(schema)
                                   if isinstance(node.get("$ref"), str) and node["$ref"].startswith("#")]

    known = {ref for _, ref in refs}

    def finite(node: Any) -> bool:
        if node is True or not isinstance(node, dict):
            return node is not False
        ref = node.get("$ref")
        if isinstance(ref, str) and ref in known and not (assume_all[0] or productive.get(ref, False)):
            return False
        for key in ("anyOf", "oneOf"):
            if isinstance(node.get(key), list) and not any(finite(child) for child in node[key]):
                return False
        if isinstance(node.get("allOf"), list) and not all(finite(child) for child in node["allOf"]):
            return False
        types = node.get("type")
        types = {types} if isinstance(types, str) else set(types) if isinstance(types, list) else None
        if types is not None and types - {"object", "array"}:
            return True  # a scalar alternative always ends
        properties = node.get("properties") if isinstance(node.get("properties"), dict) else {}
        required = node.get("required") if isinstance(node.get("required"), list) else []
        for name in required:
            if name not in properties and node.get("patternProperties"):
                continue  # may match a pattern: not worth deciding here
            child = properties.get(name, node.get("additionalProperties", True))
            if not finite(child):
                return False
        items = node.get("items")
        min_items = node.get("minItems", 0)
        if isinstance(min_items, int) and min_items > 0:
            prefix = node.get("prefixItems") if isinstance(node.get("prefixItems"), list) else \
                items if isinstance(items, list) else []
            rest = items if isinstance(items, dict) else node.get("additionalItems", True)
            for i in range(min(min_items, len(prefix) + 1)):
                if not finite(prefix[i] if i < len(prefix) else rest):
                    return False
        return True

    if not finite(schema):
        return  # unsatisfiable without any recursion: the compiler reports it
    assume_all[0] = False
    for _ in range(len(refs) + 1):
        changed = False
        for _, ref in refs:
            if productive.get(ref):
                continue
            try:
                target = resolve_pointer(schema, ref[1:])
            except KeyError:
                productive[ref] = True  # an anchor or $id: left to the compiler
                changed = True
                continue
            if finite(target):
                productive[ref] = changed = True
        if not changed:
            break
    if finite(schema):
        return
    for pointer, ref in refs:
        if not productive.get(ref):
            raise ConstraintError(
                f"json_schema: the recursive '$ref' at {pointer or '(root)'} has no base case: every document would "
                "contain itself forever; make the recursion optional (not required, minItems 0, or an anyOf "
                "branch without it)"
            )


def _dumps(schema: Any) -> str:
    import json

    return json.dumps(schema)
