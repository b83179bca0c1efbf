"""Shared fixtures: tiny random checkpoints built offline once per machine (cached by recipe hash)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Helpers shared by test modules (constraint_simulation.py) import by name: importlib mode does not
# put tests/ on sys.path.
sys.path.insert(0, str(Path(__file__).parent))

# Tests never reach a model hub: a mistyped model id must fail fast, not try a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sglite.runtime.loading.tiny_model import build_tiny_model

from sglite.runtime.models import MODEL_REGISTRY

FAMILIES = tuple(sorted(MODEL_REGISTRY))


@pytest.fixture(scope="session")
def tiny_model_factory():
    """``tiny_model_factory(family="llama", tokenizer="bpe", **recipe_overrides) -> Path``."""
    built: dict[tuple, Path] = {}

    def make(family: str = "llama", tokenizer: str = "bpe", **overrides) -> Path:
        key = (family, tokenizer, tuple(sorted(overrides.items())))
        if key not in built:
            built[key] = build_tiny_model(family, tokenizer=tokenizer, **overrides)
        return built[key]

    return make


@pytest.fixture(scope="session")
def llama_path(tiny_model_factory) -> Path:
    """The default tiny checkpoint: Llama architecture, byte-level BPE tokenizer."""
    return tiny_model_factory("llama")


@pytest.fixture(scope="session")
def sentencepiece_path(tiny_model_factory) -> Path:
    """A Llama checkpoint with a Llama-2-style SentencePiece tokenizer (``▁``, ``<0x..>`` byte fallback).

    (transformers maps a ``qwen2`` config to a byte-level tokenizer class, which would mangle it.)"""
    return tiny_model_factory("llama", tokenizer="sentencepiece")


@pytest.fixture(scope="session")
def tokenizer(llama_path):
    """The byte-level BPE tokenizer of ``llama_path``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_path)


@pytest.fixture(scope="session")
def sp_tokenizer(sentencepiece_path):
    """The SentencePiece-style tokenizer of ``sentencepiece_path``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(sentencepiece_path)


@pytest.fixture(scope="session")
def real_model_path() -> str:
    """The real default model (SmolLM2-135M-Instruct): ``$SGLITE_REAL_MODEL`` if set, else the packaged GGUF."""
    if os.environ.get("SGLITE_REAL_MODEL"):
        return os.environ["SGLITE_REAL_MODEL"]
    from sglite.runtime.loading.default_model import default_gguf_path

    return str(default_gguf_path())


@pytest.fixture(scope="module")
def runtime(llama_path):
    """An in-process ``sgl.Runtime`` on ``llama_path``, one per test module."""
    import sglite as sgl

    backend = sgl.Runtime(llama_path)
    yield backend
    backend.shutdown()


@pytest.fixture(scope="module")
def engine(llama_path):
    """An engine on the tiny checkpoint, shared by one test module (a module may define its own ``engine``)."""
    import sglite

    with sglite.Engine(str(llama_path), max_total_tokens=8192) as engine:
        yield engine


@pytest.fixture(scope="module")
def server(engine):
    """``engine`` served over HTTP in a thread of this process; the base URL."""
    from sglite.runtime.server.testing import serve_in_thread

    with serve_in_thread(engine) as url:
        yield url
