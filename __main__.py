"""``python -m sglite COMMAND``: demo, serve, run, estimate."""

from __future__ import annotations

import sys

USAGE = """usage: python -m sglite COMMAND [ARGS]

commands:
  demo       extraction + classification on the embedded SmolLM2-135M-Instruct (or --model PATH)
  serve      start the OpenAI-compatible HTTP server: serve [--model PATH|FILE.gguf] [--port 30000 ...] [--replicas N]
  run        batch job: run FILE.py:FUNCTION --input rows.jsonl --output out.jsonl [--model PATH] [--ray --replicas N]
  estimate   memory estimate: estimate MODEL|FILE.gguf [--context N --batch B --dtype D]

`python -m sglite COMMAND --help` describes each command's options."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from sglite.demo import main_demo

        return main_demo(rest)
    if command == "serve":
        from sglite.runtime.server.cli import main_serve

        return main_serve(rest)
    if command == "run":
        from sglite.lang.batch_job import main_run

        return main_run(rest)
    if command == "estimate":
        from sglite.runtime.loading.memory import main_estimate

        return main_estimate(rest)
    print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
