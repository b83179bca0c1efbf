#!/usr/bin/env bash
# The main job: an extraction program on the embedded default model (built offline at first run).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
exec "$root/.venv/bin/python" -m sglite demo "$@"
