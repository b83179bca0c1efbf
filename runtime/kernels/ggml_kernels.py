"""Which build of llama.cpp's quantized dot products runs: one per ISA level, picked by CPU feature detection.

:func:`set_kernel_level` (called once by the model runner with ``EngineConfig.cpu_kernel_level``) loads the
torch op library (``ggml_quant.cpp``) and the level's ggml library (built by
:mod:`~sglite.runtime.kernels.ggml_build`), each level's library opened RTLD_LOCAL so several coexist.
``auto`` takes the fastest level this CPU runs; a lower level can be forced (every level's kernels are
tested on any machine that has it); a level the CPU lacks is an error. Where nothing builds (no compiler,
no network for the sources) ``auto`` warns once and :mod:`~sglite.runtime.kernels.quant_linear` keeps its
reference path (gguf's numpy dequantizer and a float matmul).

    >>> set_kernel_level("portable") in ("portable", "reference")              # doctest: +SKIP
    True
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
from pathlib import Path

import torch

from sglite.runtime.kernels import ggml_build
from sglite.runtime.kernels import ops  # noqa: F401 - the op schemas the library implements

logger = logging.getLogger(__name__)

KERNEL_LEVELS = ("auto", *ggml_build.LEVELS)
"""Values of ``EngineConfig.cpu_kernel_level``."""

REFERENCE = "reference"
"""The level reported when no native kernels are loaded (gguf's numpy dequantizer, then a float matmul)."""

_OP_SOURCE = Path(__file__).with_name("ggml_quant.cpp")


class KernelLevelError(ValueError):
    """A kernel level was asked for that this CPU cannot run or this machine cannot build."""


class _State:
    level: str | None = None  # None: not chosen yet (the first matmul chooses "auto")
    warned: bool = False      # the fallback's warning is said once per process
    index: int = -1           # the op's level argument; -1 runs the reference path
    libraries: dict[str, ctypes.CDLL] = {}  # kept open for the process's life: the op holds their pointers


@functools.cache
def _load_op_library() -> None:
    """Build (or load the cached build of) the torch ops; raises where there is no C++ toolchain."""
    from torch.utils.cpp_extension import load as build

    openmp = ["-fopenmp"] if sys.platform.startswith("linux") and torch.backends.openmp.is_available() else []
    build("sglite_ggml_quant", sources=[str(_OP_SOURCE)], extra_cflags=["-O3", *openmp], extra_ldflags=openmp,
          is_python_module=False)


def _load_level(level: str) -> int:
    """Load ``level``'s library and register its kernel table with the op; returns the op's level index."""
    index = ggml_build.LEVELS.index(level)
    if level not in _State.libraries:
        _load_op_library()
        path = ggml_build.build(level)
        library = ctypes.CDLL(str(path), mode=os.RTLD_LOCAL)
        library.sg_ggml_kernels.restype = ctypes.c_void_p
        torch.ops.sglite_ggml.register_table(index, library.sg_ggml_kernels())
        _State.libraries[level] = library
    return index


def available_levels() -> tuple[str, ...]:
    """The levels this CPU runs, fastest first (``portable`` always)."""
    return ggml_build.cpu_levels()


def set_kernel_level(level: str = "auto") -> str:
    """Choose the kernels of every quantized matmul in this process; returns the level now running.

    ``auto`` picks the fastest level that runs here and builds, else the reference path (one warning).
    A named level must run on this CPU and build, or :class:`KernelLevelError` says why.
    """
    if level not in KERNEL_LEVELS:
        raise KernelLevelError(f"cpu_kernel_level must be one of {', '.join(KERNEL_LEVELS)}, got {level!r}")
    runnable = available_levels()
    if level != "auto" and level not in runnable:
        missing = sorted(ggml_build.LEVEL_CPU_FLAGS[level] - ggml_build.cpu_flags())
        raise KernelLevelError(
            f"cpu_kernel_level={level!r} needs CPU features this machine lacks ({', '.join(missing) or 'x86'}); "
            f"this CPU runs: {', '.join(runnable)}"
        )
    candidates = runnable if level == "auto" else (level,)
    errors = []
    for candidate in candidates:
        try:
            index = _load_level(candidate)
        except Exception as exc:  # noqa: BLE001 - no compiler, no sources, no network: try lower, then fall back
            errors.append(f"{candidate}: {exc}")
            continue
        _State.level, _State.index = candidate, index
        return candidate
    if level != "auto":
        raise KernelLevelError(f"the {level} kernels did not build or load: {errors[0]}")
    if not _State.warned:
        _State.warned = True
        logger.warning("the quantized CPU kernels did not build (%s); quantized layers run gguf's slow reference "
                       "dequantizer (run scripts/bootstrap.sh, or python -m sglite.runtime.kernels.ggml_build, "
                       "to see why)", "; ".join(errors))
    _State.level, _State.index = REFERENCE, -1
    return REFERENCE


def kernel_level() -> str:
    """The level quantized matmuls run at (choosing ``auto`` on first call)."""
    if _State.level is None:
        set_kernel_level("auto")
    return _State.level


def level_index() -> int:
    """The op's level argument for the current level; -1 for the reference path (hot path: no lookups)."""
    if _State.level is None:
        set_kernel_level("auto")
    return _State.index
