"""Teacher-forced next-token agreement between sglite and llama.cpp itself on the same GGUF.

    python benchmarks/llama_cpp_agreement.py [--gguf PATH] [--llama-server PATH] [--tokens 256] [--threads 2]

sglite scores a fixed text in one pass with its defaults (the GGUF's own blocks): the argmax of every
position's next-token distribution (``input_top_logprobs`` with ``logprob_start_len=0``). llama.cpp's
``llama-server`` (built natively by ``../shared/tools/build_llama_cpp.sh``, or ``--llama-server PATH``) answers
the same positions one prefix at a time (greedy, one new token, its prompt cache reusing the shared prefix).
Both read the same token ids, so the tokenizers cannot differ. sglite answers twice: in one pass (prefill rows,
float32 activations against dequantized tiles) and one prefix at a time (decode rows, activations quantized to
8 bits as llama.cpp's kernels do). The table prints the share of positions whose argmax agrees, and the
positions that differ with both picks.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import httpx

from _common import cpu_description, llama_cpp_tool

from sglite.runtime.server.testing import free_port, wait_healthy

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden press adapted from those used to make wine. Before him, "
    "books were copied by hand, a slow and expensive process that kept reading the privilege of a few. Within "
    "fifty years, presses were working in more than two hundred cities across Europe, and millions of books "
    "had been printed. The spread of printed pamphlets changed how news travelled, how scholars shared their "
    "results and how ordinary people learned to read. Scientists could compare their tables of measurements, "
    "merchants could rely on printed price lists, and governments began to publish their laws for everyone. "
    "Historians still argue about how much the press caused these changes and how much it only sped them up, "
    "but few doubt that it was one of the turning points of the modern world. Today, a single data centre "
    "holds more text than every library of that century together, and the question of who may read what "
    "has moved from the printing shop to the network."
)


def sglite_argmax(gguf: str, ids: list[int], threads: int) -> dict[str, list[int]]:
    """sglite's argmax at positions 1..len-1 (each predicting ids[j] from ids[:j]), with its defaults, two ways:
    ``one pass`` scores the whole text in one prefill; ``per prefix`` asks one greedy token after each prefix
    (the radix cache holds the rest, so each step runs one new row through the decode kernels, as llama.cpp's
    server does here)."""
    import sglite

    with sglite.Engine(gguf, num_threads=threads, max_total_tokens=4096) as engine:
        out = engine.generate(
            input_ids=ids, sampling_params={"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0, top_logprobs_num=1
        )
        one_pass = [int(top[0][1]) for top in out["meta_info"]["input_top_logprobs"][1:]]
        greedy = {"max_new_tokens": 1, "temperature": 0, "ignore_eos": True}
        per_prefix = [engine.generate(input_ids=ids[:j], sampling_params=greedy)["output_ids"][0] for j in range(1, len(ids))]
    return {"sglite one pass (prefill)": one_pass, "sglite per prefix (decode rows)": per_prefix}


def llama_cpp_argmax(binary: Path, gguf: str, ids: list[int], threads: int, extra: list[str]) -> list[int]:
    port = free_port()
    command = [str(binary), "-m", gguf, "-t", str(threads), "-c", "4096", "-np", "1", "--host", "127.0.0.1",
               "--port", str(port), "--no-webui", *extra]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(server, url, 120.0, name="llama-server")
        picks = []
        with httpx.Client(timeout=60) as client:
            for j in range(1, len(ids)):
                body = {"prompt": ids[:j], "n_predict": 1, "temperature": 0, "top_k": 1, "cache_prompt": True,
                        "return_tokens": True, "samplers": ["top_k"]}
                reply = client.post(f"{url}/completion", json=body).json()
                picks.append(int(reply["tokens"][0]))
        return picks
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", default=None, help="default: the packaged SmolLM2-135M-Instruct Q4_1 GGUF")
    parser.add_argument("--llama-server", default=None)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-server-args", default="", help="more llama-server flags, e.g. '-ctk f32 -ctv f32 -fa off'")
    args = parser.parse_args()
    from sglite.runtime.loading.default_model import default_gguf_path
    from sglite.runtime.loading.gguf_loader import gguf_model_dir
    from transformers import AutoTokenizer

    gguf = args.gguf or str(default_gguf_path())
    tokenizer = AutoTokenizer.from_pretrained(gguf_model_dir(gguf))
    ids = tokenizer.encode(TEXT, add_special_tokens=False)[: args.tokens]
    ours = sglite_argmax(gguf, ids, args.threads)
    theirs = llama_cpp_argmax(llama_cpp_tool("llama-server", args.llama_server), gguf, ids, args.threads, args.llama_server_args.split())
    print(f"# CPU: {cpu_description()}; threads {args.threads}; {Path(gguf).name}; {len(theirs)} positions; "
          f"llama-server {args.llama_server_args or '(defaults)'}")
    print("| sglite, against llama.cpp per prefix | argmax agrees | share |")
    print("|---|---|---|")
    for name, picks in ours.items():
        agree = sum(a == b for a, b in zip(picks, theirs))
        print(f"| {name} | {agree} | {100 * agree / len(theirs):.1f}% |")
    for name, picks in ours.items():
        for j, (a, b) in enumerate(zip(picks, theirs), start=1):
            if a != b:
                print(f"  {name}, position {j}: sglite {tokenizer.decode([a])!r}, llama.cpp {tokenizer.decode([b])!r}")
    sys.exit(0)


if __name__ == "__main__":
    main()
