"""Imports point one way, down the layers, and no module reaches itself again through its imports.

Every ``import`` in the package is read with ``ast`` -- the ones inside functions and under
``TYPE_CHECKING`` too, since a lazy import that hides a cycle is still a cycle -- so a back-edge or a
cycle fails here rather than in review. The layers, bottom up, as the code is:

======== ======================================================================================
level    groups (a group imports its own modules and any group on a lower level)
======== ======================================================================================
0        ``radix`` (which KV is reused), ``constraints`` (which tokens are allowed)
1        ``runtime.kernels``: C++ ops and CPU helpers; nothing from models or the runner
2        ``runtime.core``: the contracts every layer reads (config, dtypes, the batch, the KV pool)
3        ``runtime.models``: one file a model family, attention
4        ``runtime.loading``: checkpoints (HF, GGUF) into models, memory sizing
5        ``runtime.requests``: one request's life (sampling parameters, sampler, detokenizer)
6        ``runtime.runner``: one forward step of a batch, eager or compiled
7        ``runtime.scheduler``: which requests run together, and their KV slots
8        ``runtime.engine``: the loop that owns the scheduler and the runner
9        ``runtime.cluster``: engine replicas (Ray) and the router
10       ``runtime.server``: HTTP (OpenAI and SGLang-native APIs)
11       ``lang``: the language; only ``lang.backends`` reaches into the runtime
======== ======================================================================================
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Groups of top-level ``runtime/*.py`` modules (sub-packages are their own group).
RUNTIME_MODULES: dict[str, set[str]] = {
    "runtime.core": {"dtypes", "config", "forward_batch", "kv_pool"},
    "runtime.requests": {
        "request", "sampling_params", "sampler", "token_selection", "logits_processor", "detokenizer",
        "prompts", "input_processor", "logprob_text", "native_stream", "pooling",
    },
    "runtime.runner": {"model_runner", "compiled_decode", "embedder"},
    "runtime.scheduler": {"scheduler"},
    "runtime.engine": {"engine", "embedding_engine"},
}
LEVELS: list[set[str]] = [
    {"radix", "constraints"},
    {"runtime.kernels"},
    {"runtime.core"},
    {"runtime.models"},
    {"runtime.loading"},
    {"runtime.requests"},
    {"runtime.runner"},
    {"runtime.scheduler"},
    {"runtime.engine"},
    {"runtime.cluster"},
    {"runtime.server"},
    {"lang"},
]
LEVEL = {group: level for level, groups in enumerate(LEVELS) for group in groups}
# The language reaches the runtime only through its backends (the backend interface).
ONLY_THROUGH = {("sglite.lang.", "sglite.runtime."): "sglite.lang.backends."}


def group_of(module: str) -> str | None:
    """``sglite.runtime.server.app`` -> ``"runtime.server"``; the package's own top level has no group.

    >>> group_of("sglite.radix.tree"), group_of("sglite.runtime.scheduler"), group_of("sglite.runtime.models.llama")
    ('radix', 'runtime.scheduler', 'runtime.models')
    >>> group_of("sglite.lang.backends.runtime"), group_of("sglite.runtime.server"), group_of("sglite.demo")
    ('lang', 'runtime.server', None)
    """
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "sglite":
        return None
    for depth in (2, 1):
        if (group := ".".join(parts[1 : 1 + depth])) in LEVEL and len(parts) >= 1 + depth:
            return group
    if parts[1:] == ["runtime"]:
        return "runtime.engine"  # the package's front door stands with the engine
    if parts[1] == "runtime" and len(parts) == 3:
        return next((group for group, names in RUNTIME_MODULES.items() if parts[2] in names), "runtime ungrouped")
    return None


def package_modules() -> dict[str, Path]:
    """Module name -> file; a package is named by its own name (``sglite.runtime.server``)."""
    modules = {}
    for top in ("radix", "constraints", "runtime", "lang"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(("sglite", *(parts[:-1] if parts[-1] == "__init__" else parts)))] = path
    return modules


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``path`` imports, anywhere in the file, relative imports resolved.

    ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``.
    """
    names = set()
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {name for name in names if name in known and name != module}


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {module: imported_modules(module, path, set(modules)) for module, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a closed path, or None.

    >>> find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    ['a', 'b', 'c', 'a']
    >>> find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    True
    """
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path, on_path, stack = [start], {start}, [iter(sorted(graph[start]))]
        while stack:
            step = next(stack[-1], None)
            if step is None:
                finished = path.pop()
                on_path.discard(finished)
                done.add(finished)
                stack.pop()
            elif step in on_path:
                return path[path.index(step) :] + [step]
            elif step not in done and step in graph:
                path.append(step)
                on_path.add(step)
                stack.append(iter(sorted(graph[step])))
    return None


def layer_violation(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported``, or None when the edge points down (or stays in its group)."""
    own, target = group_of(importer), group_of(imported)
    if own is None or target is None or own == target:
        return None
    if "ungrouped" in own or "ungrouped" in target:
        return f"{importer if 'ungrouped' in own else imported} belongs to no group: add it to RUNTIME_MODULES"
    for (low, high), gate in ONLY_THROUGH.items():
        if importer.startswith(low) and imported.startswith(high) and not importer.startswith(gate):
            return f"{low}* reaches {high}* only through {gate}*"
    if LEVEL[target] >= LEVEL[own]:
        return f"{own} (level {LEVEL[own]}) imports {target} (level {LEVEL[target]})"
    return None


GRAPH = import_graph()


def test_the_scan_sees_every_group():
    groups = {group_of(module) for module in GRAPH}
    assert groups == set(LEVEL), groups ^ set(LEVEL)
    assert len(GRAPH) > 100 and sum(map(len, GRAPH.values())) > 250  # the walk reads the real package


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down_the_layers(module: str):
    wrong = {name: why for name in sorted(GRAPH[module]) if (why := layer_violation(module, name))}
    assert not wrong, f"{module}: {wrong}"


def test_no_import_cycles():
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH))


def test_lazy_imports_and_relative_imports_are_edges(tmp_path):
    # The checks must be able to fail: a kernel that imports a model inside a function, and a
    # radix module whose relative import reaches the runtime.
    kernel = tmp_path / "greedy_pick.py"
    kernel.write_text("def f():\n    from sglite.runtime.models import llama\n")
    edges = imported_modules("sglite.runtime.kernels.greedy_pick", kernel, set(GRAPH))
    assert edges == {"sglite.runtime.models.llama"}
    assert "level 1" in layer_violation("sglite.runtime.kernels.greedy_pick", "sglite.runtime.models.llama")
    tree = tmp_path / "tree.py"
    tree.write_text("from ..runtime import kv_pool\n")
    assert imported_modules("sglite.radix.tree", tree, set(GRAPH)) == {"sglite.runtime.kv_pool"}
    assert layer_violation("sglite.radix.tree", "sglite.runtime.kv_pool") is not None


def test_a_back_edge_or_a_cycle_in_the_real_graph_is_caught():
    # Add one upward edge to the real graph: the layer check and the cycle check both see it.
    assert layer_violation("sglite.runtime.models.llama", "sglite.runtime.scheduler") is not None
    assert layer_violation("sglite.lang.ir", "sglite.runtime.engine") == (
        "sglite.lang.* reaches sglite.runtime.* only through sglite.lang.backends.*"
    )
    assert layer_violation("sglite.lang.backends.runtime", "sglite.runtime.engine") is None
    assert layer_violation("sglite.constraints.compiler", "sglite.radix.tree") is not None  # same level, other group
    graph = {module: set(edges) for module, edges in GRAPH.items()}
    graph["sglite.runtime.kernels.library"].add("sglite.runtime.model_runner")
    cycle = find_cycle(graph)
    assert cycle is not None and "sglite.runtime.kernels.library" in cycle and cycle[0] == cycle[-1]
