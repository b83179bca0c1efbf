"""Idle OpenMP workers, given back so that another thread's parallel regions run at full speed.

torch's CPU kernels (and inductor's compiled ones) run their parallel regions on OpenMP. GNU libgomp keeps
a pool of worker threads per thread that ever opened a region, and once the process's pools together hold
more threads than there are CPUs it stops spinning between regions: every region of every team then wakes its
workers through the kernel. The engine's step loop is such a second team whenever the caller's own thread
has run a parallel torch operator (loading weights does), and its regions then pay a kernel wake-up each
(docs/performance.md has the measurements).

:func:`release_idle_workers` frees the calling thread's pool (``omp_pause_resource_all(omp_pause_soft)``,
OpenMP 5.0): a thread about to block on the engine calls it, and the step loop calls it for its own pool
when it runs out of work. Nothing else changes: thread counts stay as set, and the next parallel region on
that thread starts a new pool (tens of microseconds). Without an OpenMP runtime that has the call (another
backend, another platform) it does nothing.

    >>> import torch
    >>> _ = torch.ones(1 << 22).exp_()                      # a parallel region: this thread keeps a pool
    >>> release_idle_workers() == (_pause_all() is not None)  # freed wherever the runtime has the call
    True
"""

from __future__ import annotations

import ctypes
import functools
import logging

logger = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1
"""``omp_pause_soft``: threads are released; the runtime starts new ones on the next parallel region."""


@functools.cache
def _pause_all():
    """The process's ``omp_pause_resource_all`` (from the OpenMP runtime torch loaded), or None."""
    import torch

    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    for library in (None, "libgomp.so.1", "libiomp5.so", "libomp.so"):
        try:
            pause = ctypes.CDLL(library).omp_pause_resource_all
        except (OSError, AttributeError, TypeError):  # TypeError: no process handle from CDLL(None) on Windows
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        return pause
    logger.debug("no omp_pause_resource_all in this process: idle OpenMP workers are kept")
    return None


def release_idle_workers() -> bool:
    """Free the calling thread's idle OpenMP worker threads; whether the runtime could (False: no such call,
    or the thread is inside a parallel region)."""
    pause = _pause_all()
    return pause is not None and pause(OMP_PAUSE_SOFT) == 0
