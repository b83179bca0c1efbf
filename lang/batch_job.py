"""``python -m sglite run FILE.py:PROGRAM --input rows.jsonl --output out.jsonl``: one program call per row.

Each input line is a JSON object of the program's arguments. Each output line is
``{"index": i, "variables": {...}, "return": ..., "error": null}`` (or ``"error": "Type: message"``
and ``"variables": null`` for a row whose program failed), written in completion order.

Safe to kill: every finished row is appended and flushed at once, and a rerun skips the indices
already in the output (a line torn by the kill is dropped and its row redone), so no row is lost
and none is written twice.

    python -m sglite run examples/extract.py:extract --input rows.jsonl --output out.jsonl --model PATH
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from sglite.lang.backends.base import Backend
from sglite.lang.program import Program


class BatchJobError(ValueError):
    """The job cannot start: a bad target, unreadable input, or a corrupt output file."""


def load_program(target: str) -> Program:
    """``path/to/file.py:name`` or ``package.module:name`` -> the ``@sgl.function`` it names."""
    source, sep, name = target.rpartition(":")
    if not sep or not source or not name:
        raise BatchJobError(f"target must look like 'file.py:program' or 'module:program', got {target!r}")
    if source.endswith(".py") or Path(source).is_file():
        path = Path(source)
        if not path.is_file():
            raise BatchJobError(f"no such file: {path}")
        spec = importlib.util.spec_from_file_location(f"sglite_job_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses/pydantic look their module up while defining classes
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(source)
    program = getattr(module, name, None)
    if not isinstance(program, Program):
        raise BatchJobError(f"{target!r} is not an @sgl.function (got {type(program).__name__})")
    return program


def read_rows(path: Path) -> list[Any]:
    """The input rows, one JSON value per non-blank line (row index = position among those)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise BatchJobError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
    return rows


def completed_rows(path: Path) -> set[int]:
    """Indices already in the output; a torn last line (killed mid-write) is cut off first."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
        data = data[: data.rfind(b"\n") + 1]
    done = set()
    for line_no, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            done.add(int(json.loads(line)["index"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise BatchJobError(f"{path}:{line_no} is not a row this job wrote; use another --output") from None
    return done


def run_row(program: Program, backend: Backend, row: Any) -> dict[str, Any]:
    """One program call; a failure becomes the row's ``error`` instead of stopping the job."""
    try:
        if not isinstance(row, dict):
            raise TypeError(f"each input row must be a JSON object of {program.__name__}()'s arguments, got {row!r}")
        state = program.run(backend=backend, **row)
        return {"variables": state.stream_executor.variables, "return": state.ret_value, "error": None}
    except Exception as exc:  # noqa: BLE001 - recorded per row; the job goes on
        return {"variables": None, "return": None, "error": f"{type(exc).__name__}: {exc}"}


def run_job(program: Program, backend: Backend, rows: list[Any], output: Path, threads: int = 16,
            progress: bool = True) -> tuple[int, int]:
    """Run every row not yet in ``output``; returns ``(rows written now, rows failed now)``."""
    from tqdm.auto import tqdm

    done = completed_rows(output)
    todo = [i for i in range(len(rows)) if i not in done]
    written = failed = 0
    if not todo:
        return 0, 0
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), disable=not progress, desc=program.__name__)
    with open(output, "a", encoding="utf-8") as out, ThreadPoolExecutor(max(1, threads)) as pool:
        futures = {pool.submit(run_row, program, backend, rows[i]): i for i in todo}
        for future in as_completed(futures):
            record = {"index": futures[future], **future.result()}
            # One write + flush per row: a kill loses at most the line being written.
            out.write(json.dumps(record, ensure_ascii=False, default=repr) + "\n")
            out.flush()
            written += 1
            failed += record["error"] is not None
            bar.update(1)
    bar.close()
    return written, failed


def main_run(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m sglite run``; returns the exit code (1 if any row failed)."""
    parser = argparse.ArgumentParser(prog="python -m sglite run", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="the program: path/to/file.py:name or package.module:name")
    parser.add_argument("--input", required=True, type=Path, help="JSONL file, one object of program arguments per line")
    parser.add_argument("--output", required=True, type=Path, help="JSONL results; rows already there are skipped")
    parser.add_argument("--model", default=None, help="model directory or hub id (default: $SGLITE_MODEL, else the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--threads", type=int, default=16, help="programs in flight at once (default 16)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    from sglite.lang.backends.runtime import Runtime

    try:
        program = load_program(args.target)
        rows = read_rows(args.input)
        already = completed_rows(args.output)  # refuse a foreign output file before loading the model
    except (BatchJobError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if all(i in already for i in range(len(rows))):
        print(f"all {len(rows)} rows are already in {args.output}; nothing to do", file=sys.stderr)
        return 0
    backend = Runtime(args.model)
    try:
        written, failed = run_job(program, backend, rows, args.output, args.threads, not args.no_progress)
    finally:
        backend.shutdown()
    print(f"{written} rows written to {args.output} ({failed} failed); {len(rows) - written} were already there",
          file=sys.stderr)
    return 1 if failed else 0
