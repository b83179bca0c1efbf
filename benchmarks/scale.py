"""Big models in bounded memory: sglite and llama.cpp side by side on the same random-weight GGUF of a real shape.

Writes GGUF files of released models' shapes offline (``sglite.runtime.loading.synthetic_gguf``: Q4_0/Q8_0
blocks through the ``gguf`` package, Q4_K_M through ``llama-quantize`` from a Q8_0 file), then measures
on each, in fresh processes:

- load: sglite ``import sglite`` + ``Engine(path)`` (its small tokenizer folder already written once by an
  untimed first start) vs ``llama-server`` start until ``/health`` answers;
- peak RSS (``VmHWM``) after loading and generating a few tokens;
- disk: the GGUF file, plus sglite's cached folder (config + tokenizer, no weights);
- prefill and single-stream decode tokens/s: sglite's engine (greedy, ``ignore_eos``) vs ``llama-bench``.

llama.cpp comes from ``../shared/tools/build_llama_cpp.sh`` (``~/.cache/llama-cpp-0.3.36/build/bin``, or
``--llama-bin``); its columns are left empty when the binaries are missing.

    python benchmarks/scale.py --shape tinyllama-1.1b --qtype Q4_0 --threads 2
    python benchmarks/scale.py --shape llama-3.1-8b --qtype Q4_0 --threads 2 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from _common import cpu_description, llama_cpp_tool
from sglite.runtime.server.testing import free_port


SGLITE_PROBE = r"""
import json, sys, time
start = time.perf_counter()
import sglite
from sglite.runtime.model_runner import intra_op_threads
path, threads, prompt_tokens, gen_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter()
# no radix cache: every repetition prefills the whole prompt
engine = sglite.Engine(path, max_total_tokens=prompt_tokens + gen_tokens + 64, num_threads=threads, disable_radix_cache=True)
load = time.perf_counter() - t0
ids = [(17 + 31 * i) % 1000 + 100 for i in range(prompt_tokens)]
def run(new):
    t = time.perf_counter()
    engine.generate(input_ids=ids, sampling_params={"max_new_tokens": new, "temperature": 0, "ignore_eos": True})
    return time.perf_counter() - t
run(2)  # warm-up
prefill, decode = [], []
for _ in range(int(sys.argv[5])):
    first = run(1)
    whole = run(gen_tokens)
    prefill.append(prompt_tokens / first)
    decode.append((gen_tokens - 1) / max(whole - first, 1e-9))
engine.shutdown()
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
print(json.dumps({"load_s": load + (t0 - start), "import_s": t0 - start, "engine_s": load, "peak_rss": status("VmHWM:"), "prefill": prefill, "decode": decode}))
"""


def make_file(shape: str, qtype: str, workdir: Path, llama_bin: Path) -> Path:
    """The GGUF of ``shape`` in ``qtype``, written once into ``workdir``."""
    from sglite.runtime.loading.synthetic_gguf import SHAPES, write_synthetic_gguf

    path = workdir / f"{shape}-{qtype}.gguf"
    if path.is_file():
        return path
    workdir.mkdir(parents=True, exist_ok=True)
    if qtype in ("Q4_K_M", "Q5_K_M", "Q6_K"):
        source = make_file(shape, "Q8_0", workdir, llama_bin)
        subprocess.run([str(llama_bin / "llama-quantize"), "--allow-requantize", str(source), str(path), qtype],
                       check=True, capture_output=True)
        return path
    tmp = path.with_suffix(".tmp")
    write_synthetic_gguf(SHAPES[shape], tmp, qtype=qtype)
    tmp.rename(path)
    return path


def run_sglite(path: Path, args) -> dict:
    """Load and generate in a fresh process (after one untimed start that writes the tokenizer folder)."""
    env = dict(os.environ)
    subprocess.run([sys.executable, "-c", "import sys, sglite; sglite.Engine(sys.argv[1], max_total_tokens=64).shutdown()",
                    str(path)], check=True, capture_output=True, env=env)
    done = subprocess.run([sys.executable, "-c", SGLITE_PROBE, str(path), str(args.threads), str(args.prompt_tokens),
                           str(args.gen_tokens), str(args.repeat)], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"sglite probe failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_llama_server(path: Path, args) -> dict | None:
    """``llama-server`` start time until ``/health`` is ok, and its peak RSS after a short completion."""
    binary = args.llama_bin / "llama-server"
    if not binary.is_file():
        return None
    port = free_port()
    start = time.perf_counter()
    server = subprocess.Popen([str(binary), "-m", str(path), "--port", str(port), "-t", str(args.threads), "-c",
                               str(args.prompt_tokens + args.gen_tokens + 64), "-np", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        load = None
        while time.perf_counter() - start < 600:
            if server.poll() is not None:
                raise RuntimeError(f"llama-server exited with {server.returncode} before answering (run it by hand to see why)")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                    if reply.status == 200:
                        load = time.perf_counter() - start
                        break
            except OSError:
                time.sleep(0.05)
        body = json.dumps({"prompt": "Hello there", "n_predict": 4}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/completion", body, {"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=600).read()
        peak = None
        for line in open(f"/proc/{server.pid}/status"):
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
        return {"load_s": load, "peak_rss": peak}
    finally:
        server.terminate()
        server.wait(timeout=30)


def run_llama_bench(path: Path, args) -> dict | None:
    """``llama-bench`` prefill (pp) and decode (tg) tokens/s."""
    binary = args.llama_bin / "llama-bench"
    if not binary.is_file():
        return None
    done = subprocess.run([str(binary), "-m", str(path), "-p", str(args.prompt_tokens), "-n", str(args.gen_tokens),
                           "-t", str(args.threads), "-r", str(args.repeat), "-o", "json"],
                          capture_output=True, text=True, check=True)
    rows = json.loads(done.stdout)
    result = {}
    for row in rows:
        kind = "prefill" if row.get("n_prompt", 0) else "decode"
        result[kind] = row["avg_ts"]
    return result


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def _sec(n: float | None) -> str:
    return "-" if n is None else f"{n:.2f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", nargs="+", default=["tinyllama-1.1b"], help="shapes of synthetic_gguf.SHAPES")
    parser.add_argument("--qtype", nargs="+", default=["Q4_0"], help="Q4_0 Q8_0 Q4_1 ... or Q4_K_M (llama-quantize)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "sglite" / "scale")
    parser.add_argument("--llama-bin", type=Path, default=None, help="folder of llama.cpp's tools (default: ../shared/tools/build_llama_cpp.sh's build)")
    args = parser.parse_args(argv)
    if args.llama_bin is None:
        tool = llama_cpp_tool("llama-server")
        args.llama_bin = tool.parent if tool is not None else Path("llama.cpp-not-built")

    import torch

    from sglite.runtime.loading.gguf_loader import gguf_model_dir, sglite_cache_dir

    print("scale: sglite (quantized GGUF default path) vs llama.cpp on the same random-weight file")
    print("command: python " + " ".join(shlex.quote(a) for a in sys.argv))
    print(f"CPU: {cpu_description()}; {args.threads} threads both sides; activations float32 (sglite); torch "
          f"{torch.__version__}; prefill {args.prompt_tokens} tokens, decode {args.gen_tokens}; {args.repeat} repetitions, "
          "tok/s cells are max / median")
    print()
    print("| model | file | disk (file + sglite cache) | load sglite / llama.cpp | peak RSS sglite / llama.cpp "
          "| prefill tok/s sglite / llama.cpp | decode tok/s sglite / llama.cpp |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shape:
        for qtype in args.qtype:
            path = make_file(shape, qtype, args.workdir, args.llama_bin)
            ours = run_sglite(path, args)
            folder = gguf_model_dir(path, sglite_cache_dir())
            cache_bytes = sum(p.stat().st_size for p in folder.iterdir())
            server = run_llama_server(path, args) or {}
            bench = run_llama_bench(path, args) or {}

            def rate(values: list[float]) -> str:
                return f"{max(values):.1f} / {statistics.median(values):.1f}"

            print(f"| {shape} | {qtype} | {_gb(path.stat().st_size)} + {cache_bytes / 1e6:.1f} MB "
                  f"| {_sec(ours['load_s'])} / {_sec(server.get('load_s'))} "
                  f"| {_gb(ours['peak_rss'])} / {_gb(server.get('peak_rss'))} "
                  f"| {rate(ours['prefill'])} / {bench.get('prefill', float('nan')):.1f} "
                  f"| {rate(ours['decode'])} / {bench.get('decode', float('nan')):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
