"""Splitting a reasoning model's output into its reasoning and its answer (``sgl.separate_reasoning``).

    >>> split_reasoning("<think>2+2 is 4</think>\\n\\nFour.", "qwen3")
    ('2+2 is 4', 'Four.')
    >>> split_reasoning("it is four</think>Four.", "deepseek-r1")   # the template opened <think> itself
    ('it is four', 'Four.')
"""

from __future__ import annotations

from dataclasses import dataclass

from sglite.lang.ir import LangError


@dataclass(frozen=True)
class ReasoningMarkers:
    start: str
    end: str
    starts_in_reasoning: bool
    """The chat template already opened the reasoning, so the output starts inside it."""


MARKERS = {
    "deepseek-r1": ReasoningMarkers("<think>", "</think>", True),
    "deepseek-v3": ReasoningMarkers("<think>", "</think>", False),
    "qwen3": ReasoningMarkers("<think>", "</think>", False),
    "qwen3-thinking": ReasoningMarkers("<think>", "</think>", True),
    "glm45": ReasoningMarkers("<think>", "</think>", False),
    "kimi": ReasoningMarkers("\u25c1think\u25b7", "\u25c1/think\u25b7", False),
}
"""SGLang's reasoning-parser model types that use plain text markers."""


def reasoning_markers(model_type: str | None) -> ReasoningMarkers:
    """The markers of ``model_type`` (None: ``<think>``/``</think>``, reasoning only when opened)."""
    if model_type is None:
        return MARKERS["qwen3"]
    if model_type not in MARKERS:
        raise LangError(f"separate_reasoning(model_type={model_type!r}): supported model types are {', '.join(MARKERS)}")
    return MARKERS[model_type]


def split_reasoning(text: str, model_type: str | None) -> tuple[str, str]:
    """``(reasoning, answer)``: text between the markers, and what follows the end marker (both stripped).

    Without a start marker (and a model whose template does not open one) everything is answer;
    an unfinished reasoning (no end marker) is all reasoning.
    """
    markers = reasoning_markers(model_type)
    body = text.lstrip()
    if body.startswith(markers.start):
        body = body[len(markers.start):]
    elif not markers.starts_in_reasoning:
        return "", text
    reasoning, found, answer = body.partition(markers.end)
    if not found:
        return reasoning.strip(), ""
    return reasoning.strip(), answer.strip()
