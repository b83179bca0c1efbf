"""sglite's C++ kernels for CPUs, built once into one shared library that registers them with torch's dispatcher.

======================================  ==============================================================
``paged_decode_attention.cpp``          decode attention read in place from the KV pool
                                        (:mod:`~sglite.runtime.kernels.paged_decode`)
``greedy_pick.cpp``                     each logits row's first maximum (:mod:`~sglite.runtime.kernels.greedy_pick`)
``fused_elementwise.cpp``               SwiGLU's product and the rotary embedding in one pass
                                        (:mod:`~sglite.runtime.kernels.fused_elementwise`)
``panel_gemm.cpp``                      bfloat16 linear layers over 32-column weight panels
                                        (:mod:`~sglite.runtime.kernels.panel_gemm`)
======================================  ==============================================================

Each kernel's op schema and fake kernel are in :mod:`~sglite.runtime.kernels.ops`, its Python wrapper beside its source; the library only adds the
CPU kernels, so calls (inside ``torch.compile`` graphs too) go from the dispatcher straight into C++.
:func:`load` builds it with torch's C++ extension builder on first use (about 30-40 s, then cached on disk
under ``TORCH_EXTENSIONS_DIR`` for later processes; a changed source rebuilds). Without a C++ toolchain
it says so once and every caller keeps its torch formulation; an engine with ``native_kernels=False``
(``SGLITE_NATIVE_KERNELS=0``) does not call it.

    >>> if load():                                                           # doctest: +SKIP
    ...     assert is_loaded()
"""

from __future__ import annotations

import functools
import logging
import shutil
import sys
from pathlib import Path

import torch

from sglite.runtime.kernels import ops  # noqa: F401 - the op schemas the library implements


logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = (
    HERE / "paged_decode_attention.cpp",
    HERE / "greedy_pick.cpp",
    HERE / "fused_elementwise.cpp",
    HERE / "panel_gemm.cpp",
)

_library: list[str] = []  # the loaded library's name, once built (process-wide, like the op registry itself)


CAPABILITY_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}
"""Compile flags per ATen CPU capability: ATen's vector width (what inductor passes for its kernels) and the
instruction sets it needs, never ``-march=native``, so a build cached in a shared home directory runs on every
machine of that capability (the capability is in the library's name)."""


def _build_options() -> tuple[str, list[str], list[str]]:
    """The library's name, compile flags and link flags for this CPU."""
    capability = torch.backends.cpu.get_cpu_capability()
    flags = CAPABILITY_FLAGS.get(capability, [])
    # at::parallel_for is an inline OpenMP region in the kernels' own code: without -fopenmp it runs on one
    # thread whatever torch's thread count. Linked by soname, the region runs on the libgomp torch already loaded.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") and torch.backends.openmp.is_available() else []
    # no fused multiply-adds the source does not ask for: a multiply then an add round twice, as torch's ops do
    name = f"sglite_native_{capability.lower() if flags else 'default'}"
    return name, ["-O3", "-ffp-contract=off", *flags, *openmp], openmp


def toolchain_found() -> bool:
    """Whether this machine has what :func:`load` builds with: a C++ compiler and ninja (never builds)."""
    from torch.utils.cpp_extension import is_ninja_available

    return shutil.which("c++") is not None and is_ninja_available()


@functools.cache
def load() -> bool:
    """Build (or load the cached build of) the kernels; ``False``, logged once, where they cannot be built."""
    try:
        from torch.utils.cpp_extension import load as build

        name, flags, link_flags = _build_options()
        # a plain shared library (no Python module): loading it registers the ops' CPU kernels
        build(name, sources=[str(s) for s in SOURCES], extra_cflags=flags, extra_ldflags=link_flags, is_python_module=False)
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, a read-only cache: fall back, loudly once
        logger.warning("the C++ kernels did not build (%s); decode attention and greedy picks use torch operators, linear layers oneDNN", exc)
        return False
    _library.append(name)
    return True


def is_loaded() -> bool:
    """Whether :func:`load` has built the kernels in this process (never builds: safe in a hot path)."""
    return bool(_library)
