"""``python -m sglite run``: one program call per row, safe to kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sglite.lang.batch_job import BatchJobError, completed_rows, load_program, main_run

PROGRAM = '''
import os
import threading
from pathlib import Path

import sglite as sgl

GATE = os.environ.get("SGLITE_TEST_GATE")  # while this file is missing, rows from 5 on block forever


@sgl.function
def summarize(s, text):
    if GATE and int(text.split()[-1]) >= 5 and not Path(GATE).exists():
        threading.Event().wait()
    s += "Text: " + text + "\\nSummary:" + sgl.gen("summary", max_tokens=16, ignore_eos=True, temperature=0)
    return len(text)
'''

ROWS = 30


@pytest.fixture
def job(tmp_path: Path) -> dict[str, Path]:
    program = tmp_path / "job.py"
    program.write_text(PROGRAM)
    rows = tmp_path / "rows.jsonl"
    lines = [json.dumps({"text": f"row number {i}"}) for i in range(ROWS)]
    lines[7] = json.dumps({"wrong_argument": 1})  # this row's program fails; the job goes on
    rows.write_text("\n".join(lines) + "\n")
    return {"program": program, "rows": rows, "out": tmp_path / "out.jsonl"}


def command(job: dict[str, Path], model: Path) -> list[str]:
    return [sys.executable, "-m", "sglite", "run", f"{job['program']}:summarize", "--input", str(job["rows"]),
            "--output", str(job["out"]), "--model", str(model), "--threads", "1", "--no-progress"]


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_killed_job_resumes_without_losing_or_repeating_rows(job, llama_path, tmp_path, monkeypatch):
    gate = tmp_path / "gate"
    monkeypatch.setenv("SGLITE_TEST_GATE", str(gate))
    # The first run blocks (deterministically) on row 5, after writing rows 0-4; it is killed there.
    proc = subprocess.Popen(command(job, llama_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300  # only bounds a hang
    while not (job["out"].exists() and len(job["out"].read_text().splitlines()) >= 5):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "no progress"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert sorted(r["index"] for r in read_records(job["out"])) == [0, 1, 2, 3, 4]

    gate.touch()

    finished = subprocess.run(command(job, llama_path), capture_output=True, text=True, timeout=300)
    assert finished.returncode == 1, finished.stderr  # row 7 failed
    records = read_records(job["out"])
    assert sorted(r["index"] for r in records) == list(range(ROWS))  # each row exactly once
    by_index = {r["index"]: r for r in records}
    assert "TypeError" in by_index[7]["error"] and by_index[7]["variables"] is None
    ok = [r for i, r in by_index.items() if i != 7]
    assert all(r["error"] is None and r["variables"]["summary"] for r in ok)
    assert by_index[3]["return"] == len("row number 3")

    again = subprocess.run(command(job, llama_path), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and len(read_records(job["out"])) == ROWS  # nothing left to do


def test_torn_last_line_is_dropped_so_its_row_is_redone(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"index": 0, "variables": {}, "error": null}\n{"index": 1, "vari')
    assert completed_rows(out) == {0}
    assert out.read_text().endswith("null}\n")


def test_foreign_output_and_bad_targets_are_refused(tmp_path, job):
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"something": "else"}\n')
    with pytest.raises(BatchJobError, match="another --output"):
        completed_rows(foreign)
    with pytest.raises(BatchJobError, match="file.py:program"):
        load_program("no_colon")
    with pytest.raises(BatchJobError, match="not an @sgl.function"):
        load_program(f"{job['program']}:sgl")
    code = main_run([f"{job['program']}:summarize", "--input", str(job["rows"]), "--output", str(foreign)])
    assert code == 2


def test_example_extract_is_loadable():
    root = Path(__file__).resolve().parents[1]
    program = load_program(os.fspath(root / "examples" / "extract.py") + ":extract")
    assert program.arg_names == ["text"]
