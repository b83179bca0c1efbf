"""The one exception type of the constraint layer."""

from __future__ import annotations


class ConstraintError(ValueError):
    """A regex, JSON schema or choice list that cannot become a token constraint.

    A ``ValueError`` so that callers validating request parameters catch it with the rest;
    the message names what to change (a regex position, a schema keyword and its path, a
    JSON parse position, or the character the tokenizer cannot produce).

        >>> from sglite.constraints import ConstraintError, build_logits_processor
        >>> issubclass(ConstraintError, ValueError)
        True
    """

    param: str | None = None
    """The request field at fault (``regex``, ``json_schema``, ``choices``, ``ebnf``), set at the compile
    boundary so an HTTP 400 can name it."""


class ConstraintWarning(UserWarning):
    """A constraint was compiled with a relaxation (``lenient`` mode): the message names the keyword and where."""
