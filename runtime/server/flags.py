"""Command-line flags generated from a frozen config dataclass: one flag per field, help from its docstring.

    >>> from sglite.runtime.server.config import ServerConfig
    >>> parser = argparse.ArgumentParser()
    >>> add_dataclass_flags(parser, ServerConfig)
    >>> ServerConfig(**dataclass_values(parser.parse_args(["--port", "8000"]), ServerConfig)).port
    8000
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from collections.abc import Callable
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (attribute docstrings are not kept at runtime)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _scalar_type(annotation: Any) -> tuple[type, bool]:
    """(int/float/str/bool, accepts None) for ``T`` or ``T | None``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and args[0] in (int, float, str, bool):
            return args[0], True
        raise TypeError(f"no flag type for {annotation!r}")
    if annotation in (int, float, str, bool):
        return annotation, False
    raise TypeError(f"no flag type for {annotation!r}")


def _optional(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "") else convert(text)

    parse.__name__ = convert.__name__  # argparse names the type in its error messages
    return parse


def add_dataclass_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    skip: tuple[str, ...] = (),
    types_override: dict[str, Callable[[str], Any]] | None = None,
) -> None:
    """Add ``--field-name`` for every field of ``cls`` (booleans get ``--x/--no-x``), default None = unset."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind, nullable = _scalar_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f"{docs.get(f.name, '')} (default: {default})".strip()
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        convert = (types_override or {}).get(f.name, kind)
        metavar = f.name.upper().split("_")[-1] if kind is not str else None
        parser.add_argument(flag, dest=f.name, type=_optional(convert) if nullable else convert, default=None, help=help_text, metavar=metavar)


def dataclass_values(namespace: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line (unset flags are left to the dataclass defaults)."""
    return {
        f.name: getattr(namespace, f.name)
        for f in dataclasses.fields(cls)
        if getattr(namespace, f.name, None) is not None
    }
