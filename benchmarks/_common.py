"""Shared by the benchmark scripts: the model they default to, repetitions with min/median, the table header."""

from __future__ import annotations

import os
from pathlib import Path
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch


def default_model() -> str:
    """``$SGLITE_MODEL`` if set, else the embedded default model (SmolLM2-135M-Instruct), as ``sgl.Runtime()``."""
    from sglite.runtime.loading.default_model import default_model_path

    return default_model_path()


def default_model_dir() -> str:
    """``default_model()`` as a Hugging Face folder (a GGUF is converted once, into sglite's cache), for
    scripts that load its tokenizer with transformers."""
    from sglite.runtime.loading.gguf_loader import gguf_model_dir, is_gguf

    model = default_model()
    return str(gguf_model_dir(model)) if is_gguf(model) else model


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


def cpu_description() -> str:
    """The CPU's model name and the vector ISA flags that pick kernels (from /proc/cpuinfo where it exists)."""

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile")
    return f"{model} ({' '.join(f for f in wanted if f in flags) or 'no AVX'})"


def llama_cpp_tool(name: str, path: str | os.PathLike | None = None) -> Path | None:
    """A llama.cpp tool (``llama-bench``, ``llama-server``, ``llama-quantize``) built natively for this CPU: ``path``
    when given, else the one ``../shared/tools/build_llama_cpp.sh`` builds (cached after the first build); None
    where neither exists."""
    if path:
        return Path(path)
    script = Path(__file__).resolve().parents[1].parent / "shared" / "tools" / "build_llama_cpp.sh"
    if not script.exists():
        return None
    import subprocess

    folder = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True).stdout.strip()
    return Path(folder) / name


def header(title: str, device: str, dtype: str, repeat: int, extra: str = "") -> str:
    """The lines every table starts with: the command, and what it ran on."""
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    cpu = cpu_description()
    lines = [
        f"{title}",
        f"command: {command}",
        f"device {device}, dtype {dtype}, torch threads {torch.get_num_threads()} (host: {os.cpu_count()} CPUs, {cpu}), "
        f"torch {torch.__version__}; {repeat} repetitions, cells are min / median",
    ]
    if extra:
        lines.append(extra)
    return "\n".join(lines)


def add_common_args(parser, repeat: int = 3) -> None:
    """``--model --device --dtype --threads --repeat --quick``, the same in every script."""
    parser.add_argument("--model", default=None, help="model path or .gguf (default: $SGLITE_MODEL, else SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cpu", help="device for both sides (default cpu)")
    parser.add_argument("--dtype", default="float32", help="dtype for both sides (default float32)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the whole process (default: torch's)")
    parser.add_argument("--repeat", type=int, default=repeat, help="repetitions of each row; cells show min / median")
    parser.add_argument("--quick", action="store_true", help="small sizes and 2 repetitions: a smoke run")
    parser.add_argument("--kv-tokens", type=int, default=16384,
                        help="KV pool of each engine, in tokens (default 16384; the engine's own sizing takes a share of RAM)")


def engine_options(args, device: str, dtype: str, **more) -> dict:
    """The engine's options: the pinned device and dtype, and a bounded KV pool."""
    return {"device": device, "dtype": dtype, "max_total_tokens": args.kv_tokens, **more}


def setup(args) -> tuple[str, str, str]:
    """``(model_dir, device, dtype)``: one Hugging Face folder both sides load (a GGUF is converted once),
    the device and the canonical dtype name. Sets the process's torch threads when ``--threads`` is given."""
    from sglite.runtime.dtypes import dtype_name
    from sglite.runtime.loading.model_loader import resolve_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeat = min(args.repeat, 2)
    return str(resolve_model_path(args.model or default_model())), args.device, dtype_name(args.dtype)


def load_hf(model_dir: str, device: str, dtype: str):
    """The transformers model and tokenizer on the same device and dtype as the engine."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sglite.runtime.loading.gguf_loader import transformers_source

    path, kwargs = transformers_source(model_dir)  # a GGUF's folder has no weights: transformers reads the file
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **kwargs).to(device).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def sync(device: str) -> None:
    """Wait for queued device work, so a timer stops after the work it times."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
