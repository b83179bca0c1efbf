"""``python -m sglite run FILE.py:PROGRAM --input rows.jsonl --output out.jsonl``: one program call per row.

Each input line is a JSON object of the program's arguments. Each output line is
``{"index": i, "variables": {...}, "return": ..., "error": null}`` (or ``"error": "Type: message"``
and ``"variables": null`` for a row whose program failed, or whose input line is not valid JSON),
written in completion order.

Safe to kill: every finished row is appended and flushed at once, and a rerun skips the indices
already in the output (a line torn by the kill is dropped and its row redone), so no row is lost
and none is written twice. ``--retry-errors`` first removes the rows recorded with an error (one
atomic rewrite of the output), so they run again. ``--ray`` runs the model calls on engine
replicas on a Ray cluster (``lang/backends/ray_pool.py``); the output file stays the job's only ledger.

    python -m sglite run examples/extract.py:extract --input rows.jsonl --output out.jsonl --model PATH
    python -m sglite run examples/extract.py:extract --input rows.jsonl --output out.jsonl --ray --replicas 4
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from sglite.lang.backends.base import Backend
from sglite.lang.program import Program
from sglite.lang.backends.ray_pool import ReplicasExhaustedError


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


class InputLineError(ValueError):
    """An input line that is not valid JSON: recorded as that row's error, the other rows still run."""


def read_rows(path: Path) -> list[Any]:
    """The input rows, one JSON value per non-blank line (row index = position among those).

    A line that is not valid JSON becomes an ``InputLineError`` in its place, so one damaged line
    does not stop a long job; the row is written with that error and a rerun with
    ``--retry-errors`` (after fixing the line) redoes it.
    """
    rows: list[Any] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                rows.append(InputLineError(f"{path}:{line_no}: not valid JSON ({exc.msg} at column {exc.colno})"))
    return rows


def read_output(path: Path) -> dict[int, bool]:
    """``{index: failed}`` for the rows already in the output; a torn last line (killed mid-write) is cut off first.

    A damaged line anywhere else is refused with its line number and what is wrong with it: the
    job cannot tell whether that row is done, and only the user can decide to drop the line.
    """
    if not path.exists():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
        data = data[: data.rfind(b"\n") + 1]
    done: dict[int, bool] = {}
    for line_no, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BatchJobError(
                f"{path}:{line_no}: damaged line, not valid JSON ({exc.msg} at column {exc.colno}); the job cannot tell "
                f"which row it held. Delete that line and rerun to redo its row."
            ) from None
        index = record.get("index") if isinstance(record, dict) else None
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise BatchJobError(
                f"{path}:{line_no}: a JSON value without a non-negative integer 'index' is not a row record of "
                f"`sglite run`; use another --output"
            )
        if index in done:
            raise BatchJobError(f"{path}:{line_no}: row {index} is recorded twice; delete one of its lines")
        done[index] = record.get("error") is not None
    return done


def completed_rows(path: Path) -> set[int]:
    """Indices already in the output (see ``read_output``)."""
    return set(read_output(path))


def drop_error_rows(path: Path) -> int:
    """Rewrite ``path`` without the rows recorded with an error (atomically); how many were dropped."""
    failed = {i for i, bad in read_output(path).items() if bad}
    if not failed:
        return 0
    kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
            if line.strip() and json.loads(line)["index"] not in failed]
    tmp = path.with_name(path.name + ".retry-tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # a kill leaves either the old file or the new one, never half of each
    return len(failed)


def run_row(program: Program, backend: Backend, row: Any) -> dict[str, Any]:
    """One program call; a failure becomes the row's ``error`` instead of stopping the job."""
    try:
        if isinstance(row, InputLineError):
            raise row
        if not isinstance(row, dict):
            raise TypeError(f"each input row must be a JSON object of {program.__name__}()'s arguments, got {row!r}")
        state = program.run(backend=backend, **row)
        return {"variables": state.stream_executor.variables, "return": state.ret_value, "error": None}
    except ReplicasExhaustedError:
        raise  # no replica left: the job stops with this row unwritten, to be redone on resume
    except Exception as exc:  # noqa: BLE001 - recorded per row; the job goes on
        return {"variables": None, "return": None, "error": f"{type(exc).__name__}: {exc}"}


def run_job(program: Program, backend: Backend, rows: list[Any], output: Path, threads: int = 16,
            progress: bool = True, on_row_written: Callable[[int], None] | None = None) -> tuple[int, int]:
    """Run every row not yet in ``output``; returns ``(rows written now, rows failed now)``.

    ``on_row_written(rows written so far)`` is called after each row is flushed (progress hooks).
    """
    from tqdm.auto import tqdm

    done = completed_rows(output)
    todo = [i for i in range(len(rows)) if i not in done]
    written = failed = 0
    if not todo:
        return 0, 0
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), disable=not progress, desc=program.__name__)
    with open(output, "a", encoding="utf-8") as out, ThreadPoolExecutor(max(1, threads)) as pool:
        futures = {pool.submit(run_row, program, backend, rows[i]): i for i in todo}
        try:
            for future in as_completed(futures):
                record = {"index": futures[future], **future.result()}
                # One write + flush per row: a kill loses at most the line being written.
                out.write(json.dumps(record, ensure_ascii=False, default=repr) + "\n")
                out.flush()
                written += 1
                failed += record["error"] is not None
                bar.update(1)
                if on_row_written is not None:
                    on_row_written(written)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    bar.close()
    return written, failed


def main_run(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m sglite run``; returns the exit code (1 if any row failed)."""
    parser = argparse.ArgumentParser(prog="python -m sglite run", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="the program: path/to/file.py:name or package.module:name")
    parser.add_argument("--input", required=True, type=Path, help="JSONL file, one object of program arguments per line")
    parser.add_argument("--output", required=True, type=Path, help="JSONL results; rows already there are skipped")
    parser.add_argument("--model", default=None, help="model directory or hub id (default: $SGLITE_MODEL, else the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--threads", type=int, default=None, help="programs in flight at once (default 16, with --ray 16 per replica)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--retry-errors", action="store_true", help="rerun the rows recorded with an error (they are removed from the output first)")
    ray = parser.add_argument_group("Ray (pip install sglite[ray])")
    ray.add_argument("--ray", action="store_true", help="run the model calls on engine replicas on Ray")
    ray.add_argument("--address", default=None, help="Ray cluster to join (default: start a local Ray instance)")
    ray.add_argument("--replicas", type=int, default=None, help="engine replicas, one Ray actor each (default 2)")
    ray.add_argument("--router", choices=("prefix", "round_robin"), default="prefix", help="how calls are spread over replicas")
    ray.add_argument("--gpus-per-replica", type=float, default=None, help="GPU share per replica (default: 1 where the cluster has GPUs, else 0)")
    args = parser.parse_args(argv)
    if (args.address is not None or args.replicas is not None) and not args.ray:
        parser.error("--address and --replicas need --ray")

    try:
        program = load_program(args.target)
        rows = read_rows(args.input)
        outcome = read_output(args.output)  # refuse a damaged or foreign output file before loading the model
        if args.retry_errors and any(outcome.values()):
            print(f"retrying {drop_error_rows(args.output)} rows recorded with an error", file=sys.stderr)
            outcome = read_output(args.output)
    except (BatchJobError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if all(i in outcome for i in range(len(rows))):
        print(f"all {len(rows)} rows are already in {args.output}; nothing to do", file=sys.stderr)
        return 0
    backend = _backend(args)
    try:
        threads = args.threads or 16 * ((args.replicas or 2) if args.ray else 1)
        written, failed = run_job(program, backend, rows, args.output, threads, not args.no_progress)
    except ReplicasExhaustedError as exc:
        print(f"error: {exc}; rerun to resume (rows written so far are kept)", file=sys.stderr)
        return 3
    finally:
        backend.shutdown()
    print(f"{written} rows written to {args.output} ({failed} failed); {len(rows) - written} were already there",
          file=sys.stderr)
    return 1 if failed else 0


def _backend(args: argparse.Namespace) -> Backend:
    if args.ray:
        from sglite.lang.backends.ray_pool import RayPool

        return RayPool(args.model, replicas=args.replicas or 2, address=args.address, router=args.router,
                       gpus_per_replica=args.gpus_per_replica)
    from sglite.lang.backends.runtime import Runtime

    return Runtime(args.model)
