"""SGLang's own load generator, ``python -m sglang.bench_serving``, unchanged against ``sglite serve``:
native ``/generate`` (``--backend sglang``) and OpenAI completions (``--backend sglang-oai``), offline
(a local ShareGPT-format file, the tiny checkpoint's tokenizer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sglite.runtime.server.testing import serve_subprocess

# sglang.benchmark.serving imports sglang.srt.configs, which imports torchvision: PyPI's torchvision wheels are
# built for CUDA torch and fail to load beside the CPU one, so the compat extra leaves it out and this module
# runs where a matching torchvision is installed. Past torchvision (tried with a stand-in module) the client's
# imports reach SGLang's kernel packages (tvm_ffi, ...), so it needs SGLang's full install, not the --no-deps
# frontend. tests/test_sglang_logprobs.py posts bench_serving's exact request body instead.
pytest.importorskip("sglang.benchmark.serving", reason="needs sglang==0.5.23, datasets and a torchvision matching torch")

PROMPTS = 4
OUTPUT_LEN = 8
CONVERSATIONS = [
    {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    for question, answer in [
        ("What is the capital of France? Answer in a sentence.", "The capital of France is Paris."),
        ("Name three primary colours and say why they are primary.", "Red, yellow and blue: they mix into others."),
        ("Write a haiku about the sea at night, please.", "Dark water breathing / the moon on a silver road"),
        ("Explain in one line what a radix tree stores.", "Strings, sharing the prefixes they have in common."),
        ("How many legs does a spider have, and an insect?", "A spider has eight legs and an insect has six."),
        ("Give one tip for learning to play the piano.", "Practise slowly every day before playing fast."),
    ]
]


@pytest.fixture(scope="module")
def server(llama_path):
    with serve_subprocess(["--model", str(llama_path), "--max-total-tokens", "16384"]) as url:
        yield url


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sglang", "sglang-oai"])
def test_bench_serving_runs_against_sglite_serve(server, llama_path, tmp_path, backend):
    dataset = tmp_path / "sharegpt.json"
    dataset.write_text(json.dumps(CONVERSATIONS))
    result_file = tmp_path / "result.jsonl"
    command = [
        sys.executable, "-m", "sglang.bench_serving", "--backend", backend, "--base-url", server,
        "--model", str(llama_path), "--tokenizer", str(llama_path),
        "--dataset-name", "sharegpt", "--dataset-path", str(dataset), "--num-prompts", str(PROMPTS),
        "--sharegpt-output-len", str(OUTPUT_LEN), "--output-file", str(result_file), "--disable-tqdm", "--seed", "1",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(result_file.read_text().splitlines()[-1])
    assert result["completed"] == PROMPTS  # warm-up passed, every request succeeded
    assert result["total_output_tokens"] == PROMPTS * OUTPUT_LEN  # bench_serving sets ignore_eos
