"""The backend interface: where a program's ``gen`` and ``select`` calls are executed.

The interpreter hands a backend a ``PromptView`` (everything the program has said so far) and
gets text back; it never knows whether the model is in this process (``Runtime``), behind a
sglite/SGLang server (``RuntimeEndpoint``) or behind an OpenAI-compatible API (``OpenAI``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sglite.lang.chat_template import ChatTemplate
from sglite.lang.choices import ChoicesDecision, ChoicesSamplingMethod
from sglite.lang.ir import GenParams


class BackendNotSetError(RuntimeError):
    """A program ran without a backend."""


@dataclass(frozen=True)
class PromptView:
    """A snapshot of a program state at the moment it calls the model."""

    text: str
    """The whole prompt as text, chat turns rendered through the chat template."""
    messages: tuple[dict, ...]
    """Closed chat turns as ``{"role", "content"}`` dicts (for chat APIs)."""
    open_role: str | None
    """The role of the turn being written, if one is open."""
    open_role_text: str
    """What the open turn contains so far."""


class Backend(ABC):
    """Runs the model calls of programs; one backend may serve many programs concurrently."""

    chat_template: ChatTemplate

    @abstractmethod
    def generate(self, prompt: PromptView, params: GenParams) -> tuple[str | list[str], dict | list[dict]]:
        """Generate a completion of ``prompt``; returns ``(text, meta_info)``, or with ``params.n`` > 1
        the lists of the ``n`` samples' texts and meta infos."""

    def generate_stream(self, prompt: PromptView, params: GenParams) -> Iterator[tuple[str, dict]]:
        """Yield ``(new_text, meta_info_so_far)`` as the completion grows (default: one piece)."""
        yield self.generate(prompt, params)

    @abstractmethod
    def select(
        self, prompt: PromptView, choices: list[str], temperature: float, choices_method: ChoicesSamplingMethod
    ) -> ChoicesDecision:
        """Choose one of ``choices`` as the continuation of ``prompt``."""

    def get_model_name(self) -> str:
        """The served model's path or name (SGLang's ``get_model_name``)."""
        return str(getattr(self, "model_path", "") or getattr(self, "model_name", ""))

    def get_chat_template(self) -> ChatTemplate:
        """The chat template turns are rendered with."""
        return self.chat_template

    def cache_prefix(self, text: str) -> None:
        """Make ``text`` a cached prefix before several continuations of it run (no-op by default)."""

    def flush_cache(self) -> bool:
        """Drop cached prefixes; returns whether the backend did."""
        return False

    def get_server_info(self) -> dict[str, Any]:
        """Whatever the backend reports about itself (model, cache statistics)."""
        return {}

    def shutdown(self) -> None:
        """Release the backend's resources (engine, connections)."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


_default_backend: Backend | None = None


def set_default_backend(backend: Backend | None) -> None:
    """Use ``backend`` for every ``run``/``run_batch`` not given one.

        >>> set_default_backend(Runtime(model_path))   # doctest: +SKIP
    """
    global _default_backend
    if backend is not None and not isinstance(backend, Backend):
        raise TypeError(f"set_default_backend expects a backend (sgl.Runtime, sgl.RuntimeEndpoint, sgl.OpenAI), got {backend!r}")
    _default_backend = backend


def get_default_backend() -> Backend | None:
    """The backend set by ``set_default_backend`` (``None`` if none)."""
    return _default_backend


def resolve_backend(backend: Backend | None) -> Backend:
    """``backend`` or the default one; a clear error when there is neither."""
    chosen = backend if backend is not None else _default_backend
    if chosen is None:
        raise BackendNotSetError(
            "no backend: call sgl.set_default_backend(sgl.Runtime(model_path)) or pass backend=... to run()"
        )
    return chosen
