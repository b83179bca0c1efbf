"""Imports point one way: lang -> runtime -> radix / constraints (the README's layout line).

Every ``import`` in the package (including the ones inside functions) is read with ``ast`` and
checked against the layer it lives in, so a back-edge fails here rather than in review.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Layer of a module -> the layers it may import (its own included). ``runtime.server`` sits on the engine
# and reaches the layers below only through it; the language reaches the runtime only through its backends.
ALLOWED: dict[str, set[str]] = {
    "radix": {"radix"},
    "constraints": {"constraints"},
    "runtime": {"runtime", "radix", "constraints"},
    "runtime.server": {"runtime.server", "runtime"},
    "lang": {"lang", "lang.backends", "constraints"},
    "lang.backends": {"lang", "lang.backends", "runtime", "constraints"},
}


def layer_of(module: str) -> str | None:
    """``sglite.runtime.server.app`` -> ``"runtime.server"``; the package's own top level has no layer.

    >>> layer_of("sglite.radix.tree"), layer_of("sglite.lang.backends.runtime"), layer_of("sglite.demo")
    ('radix', 'lang.backends', None)
    """
    parts = module.split(".")
    if len(parts) < 3 or parts[0] != "sglite":
        return None
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if ".".join(parts[1:]).startswith(layer + "."):
            return layer
    return None


def package_modules() -> list[tuple[str, Path]]:
    modules = []
    for layer_dir in ("radix", "constraints", "runtime", "lang"):
        for path in sorted((ROOT / layer_dir).rglob("*.py")):
            relative = path.relative_to(ROOT).with_suffix("")
            modules.append((".".join(("sglite", *relative.parts)), path))
    return modules


def imported_modules(module: str, path: Path) -> set[str]:
    """Every ``sglite.*`` module ``path`` imports, relative imports resolved."""
    names = set()
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from sglite.x import submodule`
    return {n for n in names if n.startswith("sglite.")}


def test_the_scan_sees_the_package():
    layers = {layer_of(module) for module, _ in package_modules()}
    assert layers == set(ALLOWED)


@pytest.mark.parametrize("module,path", package_modules(), ids=lambda v: v if isinstance(v, str) else "")
def test_imports_point_down_the_layers(module: str, path: Path):
    own = layer_of(module)
    backwards = sorted(
        name for name in imported_modules(module, path)
        if (target := layer_of(name)) is not None and target not in ALLOWED[own]
    )
    assert not backwards, f"{module} ({own}) imports {backwards}, against lang -> runtime -> radix/constraints"


def test_a_back_edge_is_caught(tmp_path):
    # The check itself must be able to fail: a radix module that imports the runtime.
    bad = tmp_path / "tree.py"
    bad.write_text("def f():\n    from sglite.runtime.kv_pool import KVSlotPool\n")
    imported = imported_modules("sglite.radix.tree", bad)
    assert "sglite.runtime.kv_pool" in imported and layer_of("sglite.runtime.kv_pool") not in ALLOWED["radix"]
