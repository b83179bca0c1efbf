"""Shared by the benchmark scripts: the model they default to, repetitions with min/median, the table header."""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch


def default_model() -> str:
    """``$SGLITE_MODEL`` if set, else the language's default model (what ``sgl.Runtime()`` loads)."""
    from sglite.lang.backends.runtime import default_model_path

    return default_model_path()


def timed(fn: Callable[[], object], repeat: int) -> tuple[list[float], object]:
    """Wall seconds of ``repeat`` calls of ``fn`` (each timed alone) and the last call's result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def min_median(times: list[float], scale: float = 1.0) -> str:
    """``"min / median"`` of ``times`` (times ``scale``), for a table cell."""
    return f"{min(times) * scale:.3f} / {statistics.median(times) * scale:.3f}"


def header(title: str, device: str, dtype: str, repeat: int, extra: str = "") -> str:
    """The lines every table starts with: the command, and what it ran on."""
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    cpu = platform.processor() or platform.machine()
    lines = [
        f"{title}",
        f"command: {command}",
        f"device {device}, dtype {dtype}, torch threads {torch.get_num_threads()} (host: {os.cpu_count()} CPUs, {cpu}), "
        f"torch {torch.__version__}; {repeat} repetitions, cells are min / median",
    ]
    if extra:
        lines.append(extra)
    return "\n".join(lines)
