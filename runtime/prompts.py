"""One prompt or a batch: the rule every entry point (engine, HTTP, language backends) reads a prompt field by."""

from __future__ import annotations

from typing import Any


def is_single_prompt(source: Any) -> bool:
    """A string or a flat list of token ids is one prompt; a list of those is a batch; ``[]`` is an empty batch.

        >>> [is_single_prompt(p) for p in ("hi", [1, 2], ["a", "b"], [[1], [2, 3]], [])]
        [True, True, False, False, False]
    """
    return isinstance(source, str) or (isinstance(source, (list, tuple)) and bool(source) and isinstance(source[0], int))


def prompt_batch(source: Any) -> tuple[list, bool]:
    """``(prompts, single)``: the prompts in ``source`` as a list, and whether it was one prompt.

        >>> prompt_batch("hi"), prompt_batch([[1], [2]]), prompt_batch([])
        ((['hi'], True), ([[1], [2]], False), ([], False))
    """
    single = is_single_prompt(source)
    return ([source] if single else list(source)), single


def is_text_prompt(source: Any) -> bool:
    """Text (one string or a batch of strings) rather than token ids; ``[]`` counts as ids (an empty batch).

        >>> [is_text_prompt(p) for p in ("hi", ["a"], [1, 2], [[1]], [])]
        [True, True, False, False, False]
    """
    return isinstance(source, str) or (isinstance(source, (list, tuple)) and bool(source) and isinstance(source[0], str))
