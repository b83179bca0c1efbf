"""``Program``: what ``@sgl.function`` makes of a Python function whose first parameter is ``s``.

    >>> import sglite as sgl
    >>> @sgl.function
    ... def capital(s, country):
    ...     s += "The capital of " + country + " is" + sgl.gen("city", max_tokens=8, stop=".")
    >>> capital.run(country="France")["city"]                                   # doctest: +SKIP
    >>> [st["city"] for st in capital.run_batch([{"country": c} for c in ("Peru", "Chad")])]   # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import fields
from typing import Any

from sglite.lang.backends.base import Backend, resolve_backend
from sglite.lang.interpreter import StreamExecutor
from sglite.lang.ir import GenParams
from sglite.lang.state import ProgramState

RUN_DEFAULTS = GenParams(
    max_new_tokens=128,
    stop=[],
    stop_token_ids=[],
    temperature=1.0,
    top_p=1.0,
    top_k=-1,
    min_p=0.0,
    frequency_penalty=0.0,
    presence_penalty=0.0,
    ignore_eos=False,
)
"""Sampling defaults of ``run``/``run_batch`` (SGLang's), overridden per ``gen``."""

SAMPLING_KEYWORDS = frozenset(f.name for f in fields(GenParams)) - {"dtype", "regex", "json_schema", "grammar"}
"""Keyword arguments of ``run``/``run_batch`` that set sampling defaults instead of program arguments."""


class Program:
    """A frontend program; call ``run`` (or the program itself) to execute it.

    ``run(**kwargs)`` accepts the program's arguments plus sampling defaults for every ``gen``
    inside (``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``stop``,
    ``stop_token_ids``, ``frequency_penalty``, ``presence_penalty``, ``ignore_eos``,
    ``return_logprob``, ``logprob_start_len``, ``top_logprobs_num``), ``backend=`` and ``stream=``.
    """

    def __init__(self, func: Callable[..., Any], bind_arguments: dict[str, Any] | None = None) -> None:
        parameters = list(inspect.signature(func).parameters.values())
        if not parameters or parameters[0].name != "s":
            raise TypeError(f"@sgl.function {func.__name__}: the first parameter must be named 's' (the program state)")
        self.func = func
        self.arg_names = [p.name for p in parameters[1:]]
        self.required_args = [p.name for p in parameters[1:] if p.default is inspect.Parameter.empty]
        self.bind_arguments = dict(bind_arguments or {})
        self.__name__ = func.__name__
        self.__doc__ = func.__doc__

    def bind(self, **kwargs: Any) -> Program:
        """A copy with some arguments fixed: ``few_shot = qa.bind(examples=EXAMPLES)``."""
        unknown = sorted(set(kwargs) - set(self.arg_names))
        if unknown:
            raise TypeError(f"{self.__name__}() has no parameter(s) {', '.join(unknown)}; parameters: {', '.join(self.arg_names)}")
        return Program(self.func, {**self.bind_arguments, **kwargs})

    def run(
        self, *args: Any, backend: Backend | None = None, stream: bool = False, use_thread: bool = True, **kwargs: Any
    ) -> ProgramState:
        """Run once and return its state (already finished unless ``stream=True``).

        ``use_thread`` is accepted for SGLang compatibility; nodes always run off the program's thread.
        """
        defaults, program_kwargs = _split_sampling(kwargs)
        return run_program(self, resolve_backend(backend), args, program_kwargs, defaults, stream)

    def __call__(self, *args: Any, **kwargs: Any) -> ProgramState:
        return self.run(*args, **kwargs)

    def run_batch(
        self,
        batch_kwargs: Sequence[dict[str, Any] | Sequence[Any]],
        *,
        backend: Backend | None = None,
        num_threads: int | str = "auto",
        progress_bar: bool = False,
        generator_style: bool = False,
        **sampling: Any,
    ) -> list[ProgramState] | Iterator[ProgramState]:
        """Run once per argument dict (or positional tuple), concurrently; states in input order.

        Programs run on ``num_threads`` threads (``"auto"``: enough to keep the engine's batch
        full), so the engine batches their calls and their shared prefixes hit the radix cache.
        The first program error is re-raised after every program has ended. With
        ``generator_style`` the states are yielded in input order as they finish instead
        (a failing program raises when its turn comes).
        """
        defaults, extra = _split_sampling(sampling)
        if extra:
            raise TypeError(f"run_batch() got unexpected keyword argument(s) {', '.join(sorted(extra))}")
        backend = resolve_backend(backend)
        batch = [self._kwargs_of(item) for item in batch_kwargs]
        if generator_style:
            return self._run_batch_in_order(backend, batch, defaults, num_threads, progress_bar)
        if not batch:
            return []
        threads = _thread_count(num_threads, len(batch))
        states: list[ProgramState | None] = [None] * len(batch)
        progress = _progress(len(batch), progress_bar, self.__name__)
        with ThreadPoolExecutor(threads, thread_name_prefix="sglite-batch") as pool:
            futures = {pool.submit(run_program, self, backend, (), kw, defaults, False): i for i, kw in enumerate(batch)}
            for future in as_completed(futures):
                progress.update(1)
                if future.exception() is None:
                    states[futures[future]] = future.result()
        progress.close()
        for future in futures:  # input order: the first failing program's error wins
            if future.exception() is not None:
                raise future.exception()
        return states  # type: ignore[return-value]

    def _run_batch_in_order(
        self, backend: Backend, batch: list[dict[str, Any]], defaults: GenParams, num_threads: int | str, progress_bar: bool
    ) -> Iterator[ProgramState]:
        if not batch:
            return
        progress = _progress(len(batch), progress_bar, self.__name__)
        with ThreadPoolExecutor(_thread_count(num_threads, len(batch)), thread_name_prefix="sglite-batch") as pool:
            futures = [pool.submit(run_program, self, backend, (), kw, defaults, False) for kw in batch]
            try:
                for future in futures:
                    state = future.result()
                    progress.update(1)
                    yield state
            finally:  # the caller stopped early or a program failed: skip the programs not yet started
                for future in futures:
                    future.cancel()
                progress.close()

    def _kwargs_of(self, item: dict[str, Any] | Sequence[Any]) -> dict[str, Any]:
        if isinstance(item, dict):
            return item
        if isinstance(item, (list, tuple)) and len(item) <= len(self.arg_names):
            return dict(zip(self.arg_names, item))
        raise TypeError(f"run_batch items must be dicts of {self.__name__}()'s arguments or tuples of them, got {item!r}")

    def __repr__(self) -> str:
        return f"<sgl.function {self.__name__}({', '.join(self.arg_names)})>"


def _split_sampling(kwargs: dict[str, Any]) -> tuple[GenParams, dict[str, Any]]:
    sampling = {k: v for k, v in kwargs.items() if k in SAMPLING_KEYWORDS}
    program_kwargs = {k: v for k, v in kwargs.items() if k not in SAMPLING_KEYWORDS}
    return GenParams(**sampling).merged_over(RUN_DEFAULTS), program_kwargs


def run_program(
    program: Program, backend: Backend, args: tuple, kwargs: dict[str, Any], defaults: GenParams, stream: bool
) -> ProgramState:
    """Execute ``program`` on a fresh state. Without ``stream`` returns once every node has run;
    with it returns at once while the program runs on its own thread."""
    executor = StreamExecutor(backend, defaults, stream=stream)
    state = ProgramState(executor)
    call_kwargs = {**program.bind_arguments, **kwargs}

    def body() -> None:
        try:
            state.ret_value = program.func(state, *args, **call_kwargs)
        except BaseException as exc:
            if not stream:
                raise
            # Recorded before ``program_done`` below: a reader that sees the program done must see its error.
            executor.set_error(exc)  # surfaces through text_iter()/sync() in the caller
        finally:
            executor.program_done.set()
            executor.notify()

    if not stream:
        body()
        state.sync()
        return state

    threading.Thread(target=body, name=f"sglite-{program.__name__}", daemon=True).start()
    return state


def _thread_count(num_threads: int | str, batch_size: int) -> int:
    if num_threads == "auto":
        # Threads mostly wait on the engine; enough of them keep its running batch full.
        return max(1, min(batch_size, max(32, (os.cpu_count() or 1) * 8)))
    if not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be a positive int or 'auto', got {num_threads!r}")
    return min(num_threads, batch_size)


def _progress(total: int, enabled: bool, name: str):
    from tqdm.auto import tqdm  # the notebook widget in Jupyter, a text bar elsewhere

    return tqdm(total=total, disable=not enabled, desc=name)
