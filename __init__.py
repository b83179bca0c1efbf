"""sglite: a structured-generation language and LLM runtime that runs anywhere torch runs.

    >>> import sglite as sgl
    >>> @sgl.function
    ... def qa(s, question):
    ...     s += sgl.user(question)
    ...     s += sgl.assistant(sgl.gen("answer", max_tokens=32))
    >>> sgl.set_default_backend(sgl.Runtime("path/to/model"))  # doctest: +SKIP
    >>> qa.run(question="What is 2 + 2?")["answer"]            # doctest: +SKIP
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "Engine": "sglite.runtime.engine",
    "EngineConfig": "sglite.runtime.config",
    "SamplingParams": "sglite.runtime.sampling_params",
    "RayPool": "sglite.lang.backends.ray_pool",
}


def __getattr__(name: str):
    # Imported on first use: the engine pulls in torch and transformers, and `import sglite.runtime...`
    # (the server, the tests) should not pay for the language layer. The program API (function, gen,
    # select, Runtime, ...) comes from sglite.lang.
    import importlib

    if name.startswith("_") or name.startswith("pytest"):  # probes by tools, never the program API
        raise AttributeError(f"module 'sglite' has no attribute {name!r}")
    module = importlib.import_module(_LAZY.get(name, "sglite.lang"))
    if name in _LAZY or name in getattr(module, "__all__", ()):
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sglite' has no attribute {name!r}")


def __dir__() -> list[str]:
    import sglite.lang

    return sorted({*globals(), *_LAZY, *sglite.lang.__all__})
