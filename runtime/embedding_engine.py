"""An engine for an embedding-only model: ``sglite.Engine(path)`` is one when the model cannot generate.

An encoder checkpoint (BERT) is an embedding model as it is; a decoder one becomes one with
``is_embedding=True``. It has the surface the server and the program backends use (``encode``,
``generate`` that says why it cannot, ``get_stats``, ``shutdown`` ...) but no KV pool, scheduler or step
loop: each ``encode`` runs its packed forwards on the calling thread.

    >>> engine = sglite.Engine("path/to/all-MiniLM-L6-v2")     # doctest: +SKIP
    >>> type(engine).__name__, len(engine.encode("a cat")["embedding"])   # doctest: +SKIP
    ('EmbeddingEngine', 384)
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

from sglite.runtime.config import EngineConfig
from sglite.runtime.embedder import Embedder, NotAGenerationModelError


def is_embedding_only(model_path: str, options: dict[str, Any]) -> bool:
    """True when ``sglite.Engine(model_path, **options)`` serves embeddings only: ``is_embedding`` is set,
    or the checkpoint is an encoder (reads its config.json; a path that does not resolve is left to the
    generation engine, which reports it)."""
    if options.get("is_embedding"):
        return True
    from sglite.runtime.loading.model_loader import resolve_model_path
    from sglite.runtime.models import ENCODER_REGISTRY

    try:
        config_file = Path(resolve_model_path(str(model_path))) / "config.json"
        return json.loads(config_file.read_text()).get("model_type") in ENCODER_REGISTRY
    except (OSError, ValueError):
        return False


class EmbeddingEngine:
    """``encode`` texts or token ids with one embedding model; generation requests raise
    :class:`~sglite.runtime.embedder.NotAGenerationModelError` (a ValueError: HTTP 400) saying why."""

    is_generation = False

    def __init__(self, model_path: str, **options: Any) -> None:
        from sglite.runtime.loading.model_loader import resolve_model_path

        self.config = EngineConfig.from_options(**options)
        if self.config.embedding_model is not None:
            raise ValueError(f"embedding_model goes next to a generation model; {model_path} is an embedding model itself")
        self.model_path = str(resolve_model_path(str(model_path)))
        self.embedder = Embedder(self.model_path, self.config)
        self.tokenizer = self.embedder.tokenizer
        self.model_config = self.embedder.hf_config
        self.context_length = self.embedder.max_input_tokens
        self._stats_lock = threading.Lock()
        self._stats = {"embedding_requests_total": 0, "embedding_inputs_total": 0, "prompt_tokens_total": 0}

    def encode(
        self,
        prompt: str | list[str] | list[int] | list[list[int]],
        dimensions: int | None = None,
        truncate_prompt_tokens: int | None = None,
    ) -> dict | list[dict]:
        """One vector per input, in SGLang's shape (see :meth:`Embedder.encode`)."""
        out = self.embedder.encode(prompt, dimensions, truncate_prompt_tokens)
        rows = out if isinstance(out, list) else [out]
        with self._stats_lock:
            self._stats["embedding_requests_total"] += 1
            self._stats["embedding_inputs_total"] += len(rows)
            self._stats["prompt_tokens_total"] += sum(r["meta_info"]["prompt_tokens"] for r in rows)
        return out

    async def async_encode(self, prompt: Any, dimensions: int | None = None, truncate_prompt_tokens: int | None = None) -> dict | list[dict]:
        """``encode`` in a worker thread, so the caller's event loop keeps serving while the forwards run."""
        return await asyncio.to_thread(self.encode, prompt, dimensions, truncate_prompt_tokens)

    def _refuse_generation(self) -> NotAGenerationModelError:
        return NotAGenerationModelError(
            f"model {Path(self.model_path).name!r} is an embedding model: it serves /v1/embeddings and encode(), "
            "not generation. Serve a generation model with --embedding-model PATH to have both in one server"
        )

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse_generation()

    async def async_generate(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse_generation()

    def abort(self, rid: str) -> None:
        """Nothing runs in the background to abort (``encode`` runs on its caller's thread)."""

    def wait_idle(self, timeout: float | None = None) -> bool:
        return True

    def flush_cache(self) -> bool:
        return True  # no prefix cache

    def check_invariant(self) -> None:
        """No KV slots to account for."""

    def get_stats(self) -> dict:
        with self._stats_lock:
            return {**self._stats, "num_running": 0, "num_waiting": 0}

    def shutdown(self) -> None:
        """Nothing to stop: no step loop, no background thread."""

    def __enter__(self) -> EmbeddingEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
