"""sglite: a structured-generation language and LLM runtime that runs anywhere torch runs.

    >>> import sglite as sgl
    >>> @sgl.function
    ... def qa(s, question):
    ...     s += sgl.user(question)
    ...     s += sgl.assistant(sgl.gen("answer", max_tokens=32))
    >>> sgl.set_default_backend(sgl.Runtime("path/to/model"))
    >>> qa.run(question="What is 2 + 2?")["answer"]
"""

from __future__ import annotations

from sglite.lang import *  # noqa: F401,F403  (the program API: function, gen, select, Runtime, ...)
from sglite.lang import __all__ as _lang_all

__version__ = "0.1.0"

_LAZY = {
    "Engine": "sglite.runtime.engine",
    "EngineConfig": "sglite.runtime.config",
    "SamplingParams": "sglite.runtime.sampling_params",
}

__all__ = [*_lang_all, *_LAZY, "__version__"]


def __getattr__(name: str):
    # The engine pulls in torch and transformers; import it only when asked for.
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sglite' has no attribute {name!r}")
