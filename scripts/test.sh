#!/usr/bin/env bash
# The whole test suite (slow tests included), in the project's own virtual environment.
# --fast: only the tests not marked @pytest.mark.slow (the edit loop); CI (.ci/run) runs everything.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fast=()
if [[ "${1:-}" == "--fast" ]]; then
    fast=(-m "not slow")
    shift
fi
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec .venv/bin/python -m pytest -q "${fast[@]}" "$@"
