"""Build llama.cpp's quantized dot products into one small shared library per x86 ISA level.

The sources are the llama.cpp tree vendored in the ``llama-cpp-python`` sdist on PyPI (fetched with pip at
build time, never committed): ``ggml-quants.c`` (block layouts, dequantizers, reference quantizers),
``ggml-cpu/quants.c`` (generic dot products) and, except for ``portable``, ``ggml-cpu/arch/x86/quants.c``
(the SIMD dot products), linked with sglite's ``ggml_shim.c`` which exports one table of function pointers.
Each level is compiled with explicit ISA flags (never ``-march=native``), so a cache in a shared home
directory serves every machine, and several levels load side by side in one process (RTLD_LOCAL, one
exported symbol). A build takes well under a minute per level on two cores and is cached under
``~/.cache/sglite/ggml/``; ``scripts/bootstrap.sh`` runs ``python -m sglite.runtime.kernels.ggml_build``.

    >>> sorted(LEVEL_FLAGS)
    ['avx2', 'avx512', 'portable']
    >>> cpu_levels({"avx2", "fma", "f16c"})
    ('avx2', 'portable')
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

logger = logging.getLogger(__name__)

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
"""The llama-cpp-python sdist whose vendored llama.cpp is built (pinned: the shim mirrors its block layouts)."""

SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
HERE = Path(__file__).parent
SHIM = HERE / "ggml_shim.c"
DEFAULT_CACHE = Path.home() / ".cache" / "sglite" / "ggml"

LEVELS = ("avx512", "avx2", "portable")
"""Kernel levels, fastest first."""

LEVEL_FLAGS: dict[str, list[str]] = {
    "portable": ["-DGGML_CPU_GENERIC"],
    "avx2": ["-mavx", "-mavx2", "-mfma", "-mf16c", "-msse3", "-mssse3"],
    "avx512": ["-mavx", "-mavx2", "-mfma", "-mf16c", "-msse3", "-mssse3",
               "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"],
}
"""Compile flags per level: what llama.cpp's CMake passes for GGML_AVX2 / GGML_AVX512(+VNNI)."""

LEVEL_CPU_FLAGS: dict[str, frozenset[str]] = {
    "portable": frozenset(),
    "avx2": frozenset({"avx2", "fma", "f16c"}),
    "avx512": frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}),
}
"""The ``/proc/cpuinfo`` flags a level's code executes (``portable`` runs anywhere)."""


class KernelBuildError(RuntimeError):
    """The ggml kernels could not be fetched or compiled (the message says which step and why)."""


def cpu_flags() -> frozenset[str]:
    """This CPU's ISA flags as ``/proc/cpuinfo`` spells them (empty where that file does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_levels(flags: frozenset[str] | set[str] | None = None) -> tuple[str, ...]:
    """The levels whose code runs on a CPU with ``flags`` (this one by default), fastest first."""
    flags = cpu_flags() if flags is None else flags
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
    return tuple(level for level in LEVELS if level == "portable" or (x86 and LEVEL_CPU_FLAGS[level] <= flags))


def _compiler() -> str:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise KernelBuildError("no C compiler (cc, gcc or clang) on PATH; install build-essential")
    return cc


def _sources_root(cache: Path) -> Path:
    """The unpacked llama.cpp ``ggml`` folder, fetching the sdist from PyPI with pip when not cached."""
    unpacked = cache / SDIST_NAME
    ggml = unpacked / "vendor" / "llama.cpp" / "ggml"
    if (ggml / "src" / "ggml-quants.c").exists():
        return ggml
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary=:all:",
               f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        archives = list(Path(tmp).glob(f"{SDIST_NAME}.tar.gz"))
        if done.returncode or not archives:
            raise KernelBuildError(f"could not fetch the {SDIST_NAME} sdist from PyPI: {done.stderr.strip()[-400:]}")
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(f"{SDIST_NAME}/vendor/llama.cpp/ggml/")]
            tar.extractall(tmp, members=members, filter="data")
        os.replace(Path(tmp) / SDIST_NAME, unpacked)  # atomic: a half-unpacked tree is never seen
    return ggml


def library_path(level: str, cache: Path = DEFAULT_CACHE) -> Path:
    """Where the build of ``level`` lives: keyed by the shim's source and the level's flags."""
    key = hashlib.sha256(SHIM.read_bytes() + " ".join(LEVEL_FLAGS[level]).encode() + SDIST_NAME.encode())
    return cache / f"{SDIST_NAME}-{key.hexdigest()[:12]}" / f"libsglite_ggml_{level}.so"


def build(level: str, cache: Path = DEFAULT_CACHE) -> Path:
    """Compile (or find the cached build of) one level's library; raises :class:`KernelBuildError`."""
    if level not in LEVEL_FLAGS:
        raise KernelBuildError(f"unknown kernel level {level!r}; known: {', '.join(LEVELS)}")
    target = library_path(level, cache)
    if target.exists():
        return target
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
    if level != "portable" and not x86:
        raise KernelBuildError(f"the {level} kernels are x86 code; this machine is {platform.machine()}")
    ggml = _sources_root(cache)
    cc = _compiler()
    sources = [SHIM, ggml / "src" / "ggml-quants.c", ggml / "src" / "ggml-cpu" / "quants.c"]
    if level != "portable":
        sources.append(ggml / "src" / "ggml-cpu" / "arch" / "x86" / "quants.c")
    flags = ["-O3", "-fPIC", "-std=c11", "-fvisibility=hidden", f"-DSG_LEVEL=\"{level}\"", "-DNDEBUG",
             f"-I{ggml / 'include'}", f"-I{ggml / 'src'}", f"-I{ggml / 'src' / 'ggml-cpu'}", *LEVEL_FLAGS[level]]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        objects = [Path(tmp) / f"{i}.o" for i in range(len(sources))]

        def compile_one(pair: tuple[Path, Path]) -> subprocess.CompletedProcess:
            src, obj = pair
            return subprocess.run([cc, *flags, "-c", str(src), "-o", str(obj)], capture_output=True, text=True)

        with ThreadPoolExecutor(max_workers=max(1, min(len(sources), os.cpu_count() or 1))) as pool:
            results = list(pool.map(compile_one, zip(sources, objects)))
        for src, done in zip(sources, results):
            if done.returncode:
                raise KernelBuildError(f"compiling {src.name} for {level} failed: {done.stderr.strip()[-600:]}")
        exports = Path(tmp) / "exports.map"
        exports.write_text("{ global: sg_ggml_kernels; local: *; };\n")
        partial = Path(tmp) / target.name
        done = subprocess.run([cc, "-shared", "-o", str(partial), *map(str, objects),
                               f"-Wl,--version-script={exports}", "-Wl,-Bsymbolic", "-lm"], capture_output=True, text=True)
        if done.returncode:
            raise KernelBuildError(f"linking the {level} kernels failed: {done.stderr.strip()[-600:]}")
        os.replace(partial, target)  # atomic: a half-written library is never loaded
    return target


def main(argv: list[str] | None = None) -> int:
    """Build every level this compiler can (all three on x86, ``portable`` elsewhere); print one line each."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", nargs="*", default=list(LEVELS), choices=LEVELS)
    args = parser.parse_args(argv)
    failed = 0
    for level in args.levels:
        try:
            print(f"{level}: {build(level)}")
        except KernelBuildError as exc:
            failed += 1
            print(f"{level}: not built ({exc})")
    return 1 if failed == len(args.levels) else 0


if __name__ == "__main__":
    sys.exit(main())
