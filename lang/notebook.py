"""Program states in Jupyter: generated variables highlighted, and live updates while streaming.

    >>> state = qa.run(question="Why?", stream=True)    # doctest: +SKIP
    >>> sgl.display_stream(state)                      # updates in place  # doctest: +SKIP
    >>> state                                          # rich HTML via _repr_html_  # doctest: +SKIP
"""

from __future__ import annotations

import html
import zlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from sglite.lang.interpreter import VariableSpan


class StreamedState(Protocol):
    """What ``display_stream`` needs of a program state (``ProgramState`` is one; this module sits below it)."""

    def text_iter(self) -> Iterator[str]: ...

    def _repr_html_(self) -> str: ...


State = TypeVar("State", bound=StreamedState)

_PALETTE = ("#fde68a", "#bbf7d0", "#bfdbfe", "#fbcfe8", "#ddd6fe", "#fed7aa", "#a5f3fc", "#e5e7eb")


def variable_color(name: str) -> str:
    """A stable background color per variable name (same name, same color, across runs)."""
    return _PALETTE[zlib.crc32(name.encode()) % len(_PALETTE)]


def render_html(text: str, spans: Sequence[VariableSpan]) -> str:
    """``text`` as preformatted HTML with each variable's span highlighted and titled by its name.

        >>> from sglite.lang.interpreter import VariableSpan
        >>> render_html("Q: A: 4", [VariableSpan("answer", 6, 7)]).count('title="answer"')
        1
    """
    # Outermost spans win where spans overlap (a var_scope around a gen).
    ordered = sorted(spans, key=lambda s: (s.start, -(s.end - s.start)))
    parts, cursor = [], 0
    for span in ordered:
        if span.start < cursor or span.end <= span.start:
            continue
        parts.append(html.escape(text[cursor:span.start]))
        parts.append(
            f'<span style="background:{variable_color(span.name)};border-radius:3px" '
            f'title="{html.escape(span.name)}">{html.escape(text[span.start:span.end])}</span>'
        )
        cursor = span.end
    parts.append(html.escape(text[cursor:]))
    return '<pre style="white-space:pre-wrap;font-family:monospace">' + "".join(parts) + "</pre>"


def display_stream(state: State) -> State:
    """Show ``state`` while it streams: one output area updated in place in Jupyter,
    plain text printed as it arrives elsewhere. Returns the state once the program finished."""
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display

        in_notebook = get_ipython() is not None
    except ImportError:
        in_notebook = False
    if not in_notebook:
        for piece in state.text_iter():
            print(piece, end="", flush=True)
        print()
        return state
    handle = display(HTML(""), display_id=True)
    text = ""
    for piece in state.text_iter():
        text += piece
        handle.update(HTML(render_html(text, [])))
    handle.update(HTML(state._repr_html_()))
    return state
