"""The interpreter: runs a program's nodes in order, off the program's own thread.

``s += gen("x")`` returns at once; the node is queued on the state's ``StreamExecutor`` and a
drain thread runs queued nodes one by one, calling the backend. The program blocks only when it
reads a result (``s["x"]``, ``s.text()``). That is what lets forks, and the programs of a
``run_batch``, reach the engine together and be batched there.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any

from sglite.lang.backends.base import Backend, PromptView
from sglite.lang.chat_template import ChatTemplate
from sglite.lang.ir import (
    ConcatenateAndAppend,
    ConstantText,
    Expr,
    ExprList,
    Gen,
    GenParams,
    Image,
    LangError,
    RoleBegin,
    RoleEnd,
    Select,
    SeparateReasoning,
    VarScopeBegin,
    VarScopeEnd,
    Video,
    as_expr,
    variable_names,
)

LOGPROB_KEYS = ("input_token_logprobs", "input_top_logprobs", "output_token_logprobs", "output_top_logprobs")


def merge_stream_meta(merged: dict | None, meta: dict | None) -> dict | None:
    """The meta info of a whole streamed gen: the last chunk's counters, every chunk's logprob entries."""
    if meta is None:
        return merged
    if merged is None:
        return dict(meta)
    combined = dict(meta)
    for key in LOGPROB_KEYS:
        if key in meta or key in merged:
            combined[key] = list(merged.get(key) or []) + list(meta.get(key) or [])
    return combined


_LANG_DIR = os.path.dirname(os.path.abspath(__file__))


def _program_location() -> str:
    """The innermost caller outside this package (the program line that appended a node)."""
    frame = sys._getframe(2)
    while frame is not None and (
        frame.f_code.co_filename.startswith(_LANG_DIR) or frame.f_code.co_filename.endswith("contextlib.py")
    ):
        frame = frame.f_back
    if frame is None:
        return ""
    return f'File "{frame.f_code.co_filename}", line {frame.f_lineno}, in {frame.f_code.co_name}'


@dataclass(frozen=True)
class VariableSpan:
    """Where a variable's value sits in the state's text (for highlighting)."""

    name: str
    start: int
    end: int


@dataclass(frozen=True)
class StreamChunk:
    """One piece of appended text, and the variable it belongs to (``None``: prompt text)."""

    var_name: str | None
    text: str
    meta_info: dict | None = None


class StreamExecutor:
    """Owns one program state's text, chat messages, variables and meta info.

    Every mutation happens on the drain thread; readers wait for the nodes they depend on.
    """

    def __init__(
        self,
        backend: Backend,
        default_params: GenParams,
        stream: bool = False,
        chat_template: ChatTemplate | None = None,
        program_done: threading.Event | None = None,
    ) -> None:
        self.backend = backend
        self.default_params = default_params
        self.stream = stream
        self.chat_template = chat_template if chat_template is not None else backend.chat_template
        self.program_done = program_done if program_done is not None else threading.Event()
        """Set once the program function has returned; shared with forks."""

        self.text_ = ""
        self.messages_: list[dict] = []
        self.variables: dict[str, Any] = {}
        self.meta_info: dict[str, dict] = {}
        self.spans: list[VariableSpan] = []
        self.chunks: list[StreamChunk] = []
        self.fork_point = 0
        """Length of the text inherited from the parent (0 for a root state)."""
        self.error_: BaseException | None = None

        self._open_role: str | None = None
        self._role_start = 0
        self._scope_starts: dict[str, int] = {}
        self._pending: collections.deque[tuple[Expr, str]] = collections.deque()
        self._unfinished = 0
        self._draining = False
        self._var_events: dict[str, threading.Event] = {}
        self._held_vars: set[str] = set()
        """Variables whose readers must wait for a later node (``separate_reasoning`` rewrites them)."""
        self._cond = threading.Condition()

    # ---- submission (program thread) -------------------------------------------------------
    def submit(self, value: Expr | str) -> None:
        """Queue a node; returns immediately. ``where`` is kept to point errors at the program line."""
        expr = as_expr(value)
        where = _program_location()
        with self._cond:
            for name in variable_names(expr):
                self._var_events.setdefault(name, threading.Event()).clear()
            self._pending.append((expr, where))
            self._unfinished += 1
            if not self._draining:
                self._draining = True
                threading.Thread(target=self._drain, name="sglite-program", daemon=True).start()

    def _drain(self) -> None:
        while True:
            with self._cond:
                if not self._pending:
                    self._draining = False
                    self._cond.notify_all()
                    return
                expr, where = self._pending.popleft()
            try:
                if self.error_ is None:
                    self._execute(expr)
                else:  # skipped after a failure: its variables will never come, wake their readers
                    for name in variable_names(expr):
                        self._var_events[name].set()
            except BaseException as exc:  # re-raised in the program's thread by sync()/get_var()
                if hasattr(exc, "add_note") and where:
                    exc.add_note(f"raised while running {type(expr).__name__} appended at:\n  {where}")
                self.set_error(exc)
            finally:
                with self._cond:
                    self._unfinished -= 1
                    self._cond.notify_all()

    def set_error(self, exc: BaseException) -> None:
        """Record the first failure; wakes everyone waiting on a variable so they can raise it."""
        with self._cond:
            if self.error_ is None:
                self.error_ = exc
            for event in self._var_events.values():
                event.set()
            self._cond.notify_all()

    # ---- waiting (any thread) ---------------------------------------------------------------
    def sync(self) -> None:
        """Wait until every queued node has run; raise the program's error if one failed."""
        with self._cond:
            while self._unfinished:
                self._cond.wait()
        if self.error_ is not None:
            raise self.error_

    def get_var(self, name: str) -> Any:
        event = self._var_events.get(name)
        if event is not None:
            event.wait()
            if self.error_ is not None:
                raise self.error_
        elif name not in self.variables:
            self.sync()
        if name not in self.variables:
            known = ", ".join(map(repr, self.variables)) or "none yet"
            raise KeyError(f"no variable {name!r} in this program state (defined: {known})")
        return self.variables[name]

    def set_var(self, name: str, value: Any) -> None:
        self.sync()
        self.variables[name] = value

    def get_meta_info(self, name: str) -> dict:
        self.get_var(name)
        return self.meta_info.get(name, {})

    def text(self) -> str:
        self.sync()
        return self.text_

    def messages(self) -> list[dict]:
        self.sync()
        return list(self.messages_)

    def is_done(self) -> bool:
        """The program has returned and every node it queued has run."""
        return self.program_done.is_set() and self._unfinished == 0

    def wait_for_chunks(self, index: int, timeout: float) -> tuple[list[StreamChunk], bool]:
        """Chunks from ``index`` on (waiting up to ``timeout`` for some), and whether no more will come."""
        with self._cond:
            if len(self.chunks) <= index and not self.is_done() and self.error_ is None:
                self._cond.wait(timeout)
            done = (self.is_done() or self.error_ is not None) and self._unfinished == 0
            return self.chunks[index:], done

    def var_finished(self, name: str) -> bool:
        event = self._var_events.get(name)
        return event is not None and event.is_set()

    def notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ---- forks --------------------------------------------------------------------------------
    def fork(self, size: int) -> list[StreamExecutor]:
        """``size`` copies sharing this state's text, whose common prefix is cached once first."""
        if not isinstance(size, int) or size < 1:
            raise LangError(f"fork(n) needs a positive integer, got {size!r}")
        self.sync()
        if size > 1:
            # Prefill the shared prefix once, so every branch starts from a cache hit.
            self.backend.cache_prefix(self.text_)
        children = []
        for _ in range(size):
            child = StreamExecutor(self.backend, self.default_params, self.stream, self.chat_template, self.program_done)
            child.text_ = self.text_
            child.messages_ = list(self.messages_)
            child.variables = dict(self.variables)
            child.meta_info = dict(self.meta_info)
            child.spans = list(self.spans)
            child.fork_point = len(self.text_)
            child._open_role, child._role_start = self._open_role, self._role_start
            child._scope_starts = dict(self._scope_starts)
            children.append(child)
        return children

    # ---- execution (drain thread) ---------------------------------------------------------------
    def _append(self, text: str, var_name: str | None = None, meta_info: dict | None = None) -> None:
        with self._cond:
            self.text_ += text
            self.chunks.append(StreamChunk(var_name, text, meta_info))
            self._cond.notify_all()

    def _finish_var(self, name: str | None, value: Any, meta_info: dict | None, start: int) -> None:
        if name is None:
            return
        self.variables[name] = value
        if meta_info is not None:
            self.meta_info[name] = meta_info
        self.spans.append(VariableSpan(name, start, len(self.text_)))
        if name not in self._held_vars:
            self._var_events.setdefault(name, threading.Event()).set()

    def _prompt(self) -> PromptView:
        open_text = self.text_[self._role_start:] if self._open_role else ""
        return PromptView(self.text_, tuple(self.messages_), self._open_role, open_text)

    def _execute(self, expr: Expr) -> None:
        if isinstance(expr, ExprList):
            for item in expr.items:
                self._execute(item)
        elif isinstance(expr, ConstantText):
            self._append(expr.value)
        elif isinstance(expr, Gen):
            self._execute_gen(expr)
        elif isinstance(expr, Select):
            self._execute_select(expr)
        elif isinstance(expr, RoleBegin):
            self._begin_role(expr.role)
        elif isinstance(expr, RoleEnd):
            self._end_role(expr.role)
        elif isinstance(expr, VarScopeBegin):
            self._scope_starts[expr.name] = len(self.text_)
        elif isinstance(expr, VarScopeEnd):
            if expr.name not in self._scope_starts:
                raise LangError(f"var_scope {expr.name!r} ended without beginning")
            start = self._scope_starts.pop(expr.name)
            self._finish_var(expr.name, self.text_[start:], None, start)
        elif isinstance(expr, (Image, Video)):
            kind = "image" if isinstance(expr, Image) else "video"
            raise LangError(
                f"sgl.{kind}(...) needs a vision-language model; {self.backend.get_model_name() or 'this backend'} "
                "serves a text-only model (no image or video input is sent, so none can be ignored silently)"
            )
        elif isinstance(expr, SeparateReasoning):
            self._execute_separate_reasoning(expr)
        elif isinstance(expr, ConcatenateAndAppend):
            for child in expr.executors:
                child.sync()
                self._append(child.text_[child.fork_point:])
        else:
            raise LangError(f"cannot run node {expr!r}")

    def _execute_gen(self, node: Gen) -> None:
        params = node.params.merged_over(self.default_params)
        start = len(self.text_)
        prompt = self._prompt()
        if self.stream and params.sample_count() > 1:
            raise LangError("gen(n=...) with several samples cannot stream; run the program without stream=True")
        if self.stream:
            value, meta, pending = "", None, None
            for delta, chunk_meta in self.backend.generate_stream(prompt, params):
                value += delta
                meta = merge_stream_meta(meta, chunk_meta)
                # An event without text (half a character, EOS) hands its logprobs to the next piece.
                pending = merge_stream_meta(pending, chunk_meta)
                if node.name is not None:
                    self.variables[node.name] = value
                if delta:
                    self._append(delta, node.name, pending)
                    pending = None
        else:
            value, meta = self.backend.generate(prompt, params)
            # n > 1: SGLang's shape, the list of samples in the variable and the first one in the text
            self._append(value[0] if isinstance(value, list) else value, node.name, meta)
        self._finish_var(node.name, value, meta, start)

    def _execute_separate_reasoning(self, node: SeparateReasoning) -> None:
        from sglite.lang.reasoning import split_reasoning

        names = variable_names(node.inner)
        self._held_vars.update(names)
        try:
            self._execute(node.inner)
        finally:
            self._held_vars.difference_update(names)
        for name in names:
            span = next(sp for sp in reversed(self.spans) if sp.name == name)
            value = self.variables[name]
            parts = [split_reasoning(v, node.model_type) for v in value] if isinstance(value, list) else None
            reasoning, answer = ([p[0] for p in parts], [p[1] for p in parts]) if parts else split_reasoning(value, node.model_type)
            shown = answer[0] if isinstance(answer, list) else answer
            with self._cond:  # the text keeps only the answer, as in SGLang
                self.text_ = self.text_[: span.start] + shown + self.text_[span.end :]
            self.spans = [sp for sp in self.spans if sp is not span] + [VariableSpan(name, span.start, span.start + len(shown))]
            self.variables[name] = answer
            self.variables[SeparateReasoning.reasoning_name(name)] = reasoning
            for var in (name, SeparateReasoning.reasoning_name(name)):
                self._var_events.setdefault(var, threading.Event()).set()

    def _execute_select(self, node: Select) -> None:
        start = len(self.text_)
        decision = self.backend.select(self._prompt(), node.choices, node.temperature, node.choices_method)
        self._append(decision.decision, node.name, decision.meta_info)
        self._finish_var(node.name, decision.decision, decision.meta_info, start)

    def _begin_role(self, role: str) -> None:
        if self._open_role is not None:
            raise LangError(f"cannot open a {role!r} turn inside the open {self._open_role!r} turn; close it first")
        prior = [m["role"] for m in self.messages_]
        self._append(self.chat_template.role_prefix(prior, role))
        self._open_role, self._role_start = role, len(self.text_)

    def _end_role(self, role: str) -> None:
        if self._open_role != role:
            raise LangError(f"cannot close a {role!r} turn: the open turn is {self._open_role!r}")
        prior = [m["role"] for m in self.messages_]
        self.messages_.append({"role": role, "content": self.text_[self._role_start:]})
        self._open_role = None
        self._append(self.chat_template.role_suffix(prior, role))


class ChunkCursor:
    """Reads a state's stream log from the start, optionally only one variable's pieces."""

    def __init__(self, executor: StreamExecutor, var_name: str | None) -> None:
        self.executor = executor
        self.var_name = var_name
        self.index = 0
        self.finished = False

    def poll(self, timeout: float = 0.1) -> list[StreamChunk]:
        """New matching chunks (waiting up to ``timeout``); sets ``finished`` when none can follow."""
        # A variable's event is set after its last chunk is logged, so check it first.
        var_done = self.var_name is not None and self.executor.var_finished(self.var_name)
        chunks, done = self.executor.wait_for_chunks(self.index, 0.0 if var_done else timeout)
        self.index += len(chunks)
        self.finished = done or var_done
        return [c for c in chunks if self.var_name is None or c.var_name == self.var_name]

    def raise_if_failed(self) -> None:
        """After the last chunk: re-raise the program's error, if it failed."""
        if self.executor.error_ is not None:
            raise self.executor.error_
