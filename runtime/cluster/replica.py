"""One ``sglite.Engine`` inside a Ray actor: the unit a pool places, routes to and replaces.

The class is plain Python; ``ReplicaPool`` turns it into an actor with ``ray.remote`` at start,
so importing this module needs no Ray. Methods run on the actor's thread pool (the engine is
thread-safe and batches concurrent calls), so many requests share one replica's batch and cache.

    >>> replica = EngineReplica(tiny_model_path, {"max_total_tokens": 512})   # doctest: +SKIP
    >>> replica.generate({"prompt": "Hi", "sampling_params": {"max_new_tokens": 2}})["meta_info"]  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any


class EngineReplica:
    """An engine in an actor process; every call is the engine's own, by keyword arguments."""

    def __init__(self, model_path: str, engine_options: dict[str, Any]) -> None:
        from sglite.runtime.engine import Engine

        self.calls_finished = 0
        self.startup_error: Exception | None = None
        try:
            self.engine = Engine(model_path, **engine_options)
        except Exception as exc:  # kept for ready(): Ray would report a constructor error as a dead actor, not as itself
            self.startup_error = exc

    def ready(self) -> dict[str, Any]:
        """Where the replica runs and what it serves (the pool waits on this after placing it); a failed start raises here."""
        if self.startup_error is not None:
            raise self.startup_error
        return {
            "pid": os.getpid(),
            "model_path": self.engine.model_path,
            "context_length": self.engine.context_length,
            "device": str(self.engine.runner.device),
        }

    def tokenizer(self) -> Any:
        """The engine's tokenizer (pickled to the caller, so the driver needs no model files)."""
        return self.engine.tokenizer

    def generate(self, kwargs: dict[str, Any]) -> dict | list[dict]:
        """``Engine.generate(**kwargs)`` without streaming."""
        try:
            return self.engine.generate(**kwargs)
        finally:
            self.calls_finished += 1

    def generate_stream(self, kwargs: dict[str, Any]) -> Iterator[dict]:
        """``Engine.generate(stream=True, **kwargs)``: each chunk is one object of a Ray streaming generator."""
        try:
            yield from self.engine.generate(stream=True, **kwargs)
        finally:
            self.calls_finished += 1

    def abort(self, rid: str) -> None:
        self.engine.abort(rid)

    def get_stats(self) -> dict[str, Any]:
        return {**self.engine.get_stats(), "replica_calls_finished": self.calls_finished}

    def flush_cache(self) -> bool:
        return self.engine.flush_cache()

    def check_invariant(self) -> None:
        self.engine.check_invariant()

    def shutdown(self) -> None:
        self.engine.shutdown()
