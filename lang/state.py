"""``ProgramState`` (the ``s`` a program writes to) and ``ProgramStateGroup`` (what ``s.fork(n)`` returns).

    >>> import sglite as sgl
    >>> @sgl.function
    ... def qa(s, question):
    ...     s += "Q: " + question + "\\nA:" + sgl.gen("answer", max_tokens=16, stop="\\n")
    >>> state = qa.run(question="What is 2+2?")        # doctest: +SKIP
    >>> state["answer"], state.get_meta_info("answer")["cached_tokens"]   # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sglite.lang.interpreter import ChunkCursor, StreamExecutor
from sglite.lang.notebook import render_html
from sglite.lang.ir import (
    ConcatenateAndAppend,
    Expr,
    ExprList,
    LangError,
    RoleBegin,
    RoleEnd,
    VarScopeBegin,
    VarScopeEnd,
    as_expr,
)


class ProgramState:
    """The text, chat messages and variables of one running program.

    ``s += expr`` queues ``expr`` and returns at once; reading (``s["x"]``, ``s.text()``) waits for
    what it needs and re-raises, with its traceback, any error the program hit.
    """

    def __init__(self, executor: StreamExecutor) -> None:
        self.stream_executor = executor
        self.ret_value: Any = None
        """What the program function returned."""

    # ---- writing ---------------------------------------------------------------------------
    def __iadd__(self, other: Expr | str) -> ProgramState:
        self.stream_executor.submit(other)
        return self

    def _role(self, role: str, expr: Expr | str | None):
        if expr is not None:
            self.stream_executor.submit(ExprList([RoleBegin(role), as_expr(expr), RoleEnd(role)]))
            return None
        return self._role_scope(role)

    @contextmanager
    def _role_scope(self, role: str) -> Iterator[None]:
        self.stream_executor.submit(RoleBegin(role))
        yield
        self.stream_executor.submit(RoleEnd(role))

    def system(self, expr: Expr | str | None = None):
        """``s.system("...")`` appends a system turn; ``with s.system(): ...`` wraps one."""
        return self._role("system", expr)

    def user(self, expr: Expr | str | None = None):
        """``s.user("...")`` appends a user turn; ``with s.user(): ...`` wraps one."""
        return self._role("user", expr)

    def assistant(self, expr: Expr | str | None = None):
        """``s.assistant(gen("x"))`` appends an assistant turn; ``with s.assistant(): ...`` wraps one."""
        return self._role("assistant", expr)

    @contextmanager
    def var_scope(self, name: str) -> Iterator[None]:
        """Everything appended inside the ``with`` block becomes variable ``name``."""
        self.stream_executor.submit(VarScopeBegin(name))
        yield
        self.stream_executor.submit(VarScopeEnd(name))

    def fork(self, size: int = 1) -> ProgramStateGroup:
        """``size`` states continuing from this one; their shared prefix is computed once."""
        return ProgramStateGroup([ProgramState(e) for e in self.stream_executor.fork(size)], self)

    @contextmanager
    def copy(self) -> Iterator[ProgramState]:
        """A single fork for a side computation, joined when the ``with`` block ends."""
        group = self.fork(1)
        yield group[0]
        group.join()

    # ---- reading ---------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        return self.stream_executor.get_var(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self.stream_executor.set_var(name, value)

    def __contains__(self, name: str) -> bool:
        self.stream_executor.sync()
        return name in self.stream_executor.variables

    def get_var(self, name: str) -> Any:
        return self.stream_executor.get_var(name)

    def set_var(self, name: str, value: Any) -> None:
        self.stream_executor.set_var(name, value)

    def get_meta_info(self, name: str) -> dict:
        """Token counts (``prompt_tokens``, ``completion_tokens``, ``cached_tokens``), finish reason,
        logprobs when asked; for ``select``: ``normalized_prompt_logprobs`` per choice."""
        return self.stream_executor.get_meta_info(name)

    def text(self) -> str:
        """The whole text so far (waits for queued nodes)."""
        return self.stream_executor.text()

    def messages(self) -> list[dict]:
        """Closed chat turns as ``{"role", "content"}`` dicts."""
        return self.stream_executor.messages()

    def sync(self) -> None:
        """Wait for every queued node; raise the program's error if it failed."""
        self.stream_executor.sync()

    def error(self) -> BaseException | None:
        """The error the program hit, if any (without raising it)."""
        return self.stream_executor.error_

    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """Yield text as it is appended (all of it, or only variable ``var_name``'s).

        With ``run(stream=True)`` pieces arrive token by token; otherwise one piece per node.
        """
        cursor = ChunkCursor(self.stream_executor, var_name)
        while not cursor.finished:
            for chunk in cursor.poll():
                yield chunk.text
        cursor.raise_if_failed()

    async def text_async_iter(self, var_name: str | None = None, return_meta_data: bool = False) -> AsyncIterator:
        """``text_iter`` for asyncio; with ``return_meta_data`` yields ``(text, meta_info)`` pairs."""
        cursor = ChunkCursor(self.stream_executor, var_name)
        while not cursor.finished:
            for chunk in await asyncio.to_thread(cursor.poll):
                yield (chunk.text, chunk.meta_info) if return_meta_data else chunk.text
        cursor.raise_if_failed()

    def _repr_html_(self) -> str:
        """The text with each variable highlighted, for Jupyter (waits for queued nodes)."""
        text = self.text()
        return render_html(text, self.stream_executor.spans)

    def __repr__(self) -> str:
        # SGLang's exact form, raw text unescaped: programs slice it (``str(state)[len("ProgramState("):-1]``)
        return f"ProgramState({self.text()})"


class ProgramStateGroup:
    """The states of one fork: index them, ``+=`` to all, then ``join()``."""

    def __init__(self, states: list[ProgramState], source: ProgramState) -> None:
        self.states = states
        self.source = source

    def __getitem__(self, index: int) -> ProgramState:
        return self.states[index]

    def __setitem__(self, index: int, value: ProgramState) -> None:
        # `forks[i] += ...` rebinds the item to the same state; anything else is a mistake.
        if value is not self.states[index]:
            raise LangError("a fork group's items cannot be replaced")

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self.states)

    def __iadd__(self, other: Expr | str | Callable[[int], Expr | str] | list | tuple) -> ProgramStateGroup:
        """An expression goes to every state; a list gives one per state; a callable gets the index."""
        if isinstance(other, (list, tuple)):
            if len(other) != len(self.states):
                raise LangError(f"got {len(other)} expressions for {len(self.states)} forks")
            parts = list(other)
        elif callable(other) and not isinstance(other, Expr):
            parts = [other(i) for i in range(len(self.states))]
        else:
            parts = [other] * len(self.states)
        for state, part in zip(self.states, parts):
            state += part
        return self

    def join(self, mode: str = "gather_variable") -> None:
        """Wait for every fork. ``gather_variable``: each variable new in the forks becomes a list
        in the source state; ``concate_and_append``: the forks' texts are appended to it."""
        if mode == "gather_variable":
            source = self.source.stream_executor
            source.sync()
            known = set(source.variables)
            for state in self.states:
                state.sync()
                for name, value in state.stream_executor.variables.items():
                    if name not in known:
                        source.variables.setdefault(name, []).append(value)
        elif mode == "concate_and_append":
            self.source += ConcatenateAndAppend([s.stream_executor for s in self.states])
            self.source.sync()
        else:
            raise LangError(f"join mode must be 'gather_variable' or 'concate_and_append', got {mode!r}")
