"""Mirror of ``sglang.srt.constrained.outlines_backend``: SGLang's ``json_decode.py`` imports
``build_regex_from_object`` from here.

    >>> from sglite.srt.constrained.outlines_backend import build_regex_from_object
    >>> build_regex_from_object({"enum": ["sword", "axe"]})
    '("sword"|"axe")'
"""

from __future__ import annotations

from sglite.lang.schema_regex import build_regex_from_object

__all__ = ["build_regex_from_object"]
