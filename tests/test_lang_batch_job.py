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


def test_damaged_middle_output_line_is_refused_with_its_line_number_and_cause(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"index": 0, "error": null}\n{"index": 1, "variables": {"summ\n{"index": 2, "error": null}\n')
    with pytest.raises(BatchJobError, match=r"out.jsonl:2: damaged line, not valid JSON \(Unterminated string .*column \d+\).*Delete that line"):
        completed_rows(out)
    out.write_text('{"index": 0, "error": null}\n{"index": 0, "error": null}\n')
    with pytest.raises(BatchJobError, match=r"out.jsonl:2: row 0 is recorded twice"):
        completed_rows(out)
    out.write_text('{"index": 0, "error": null}\n{"index": "3"}\n')
    with pytest.raises(BatchJobError, match=r"out.jsonl:2: a JSON value without a non-negative integer 'index'"):
        completed_rows(out)


@pytest.mark.slow
def test_corrupt_input_line_is_its_rows_error_and_retry_errors_redoes_it(tmp_path, llama_path):
    program = tmp_path / "job.py"
    program.write_text(PROGRAM)
    rows, out = tmp_path / "rows.jsonl", tmp_path / "out.jsonl"
    lines = [json.dumps({"text": f"row {i}"}) for i in range(5)]
    rows.write_text("\n".join(lines[:2] + ['{"text": "row 2"'] + lines[3:]) + "\n")  # line 3 lost its brace
    argv = [f"{program}:summarize", "--input", str(rows), "--output", str(out), "--model", str(llama_path),
            "--threads", "1", "--no-progress"]

    assert main_run(argv) == 1  # the job went on past the damaged line
    by_index = {r["index"]: r for r in read_records(out)}
    assert sorted(by_index) == [0, 1, 2, 3, 4]
    assert by_index[2]["error"].startswith("InputLineError: ") and "rows.jsonl:3: not valid JSON" in by_index[2]["error"]
    assert all(by_index[i]["error"] is None for i in (0, 1, 3, 4))

    rows.write_text("\n".join(lines) + "\n")  # the user repairs the line
    assert main_run(argv) == 0  # without --retry-errors a recorded error counts as done
    assert len(read_records(out)) == 5
    assert {r["index"]: r["error"] for r in read_records(out)}[2] is not None

    assert main_run(argv + ["--retry-errors"]) == 0
    records = read_records(out)
    assert sorted(r["index"] for r in records) == [0, 1, 2, 3, 4]  # still exactly once
    redone = {r["index"]: r for r in records}
    assert redone[2]["error"] is None and redone[2]["variables"]["summary"] and redone[2]["return"] == len("row 2")
    assert [redone[i] for i in (0, 1, 3, 4)] == [by_index[i] for i in (0, 1, 3, 4)]  # the good rows were kept as written


def test_a_job_whose_replicas_are_all_gone_stops_without_recording_the_row(tmp_path):
    """Losing every replica is not the row's fault: the row stays unwritten, to be redone on resume."""
    from sglite.lang.backends.native import NativeBackend
    from sglite.lang.batch_job import run_job
    from sglite.lang.chat_template import resolve_chat_template
    from sglite.runtime.cluster.errors import ReplicasExhaustedError

    class LosesItsReplicasAtRow3(NativeBackend):
        chat_template = resolve_chat_template("chatml", "test")

        def _generate(self, prompt, sampling_params, *args, **kwargs):
            if "row number 3" in prompt:
                raise ReplicasExhaustedError("every replica has died")
            return {"text": "ok", "meta_info": {"prompt_tokens": 1, "completion_tokens": 1, "cached_tokens": 0}}

        def _generate_stream(self, *args, **kwargs):
            raise NotImplementedError

    namespace: dict = {}
    exec(PROGRAM, namespace)
    out = tmp_path / "out.jsonl"
    rows = [{"text": f"row number {i}"} for i in range(6)]
    with pytest.raises(ReplicasExhaustedError):
        run_job(namespace["summarize"], LosesItsReplicasAtRow3(), rows, out, threads=1, progress=False)
    assert [r["index"] for r in read_records(out)] == [0, 1, 2]
