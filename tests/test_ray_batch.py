"""Batch jobs on engine replicas on a local Ray instance: exactly-once rows, replica loss, driver loss, prefix affinity."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

import sglite as sgl  # noqa: E402
from sglite.lang.batch_job import load_program, run_job  # noqa: E402
from sglite.lang.backends.ray_pool import RayPool  # noqa: E402
from sglite.runtime.cluster.pool import LOCAL_SYSTEM_CONFIG, PoolConfig  # noqa: E402
from sglite.runtime.cluster.router import RouterConfig  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # a Ray that cannot start must not hang CI

PROGRAM = '''
import sglite as sgl

@sgl.function
def answer(s, header, question):
    s += header + "Q: " + question + "\\nA:" + sgl.gen("answer", max_tokens=4, ignore_eos=True, temperature=0)
    return len(question)
'''

ROWS = 200
HEADERS = [f"Example set {k}: " + " ".join(f"fact{k}-{j} is {j * k}." for j in range(40)) + "\n" for k in range(7)]


@pytest.fixture(scope="module")
def ray_address():
    """One small local Ray instance per module (2 CPUs: one per replica), always shut down."""
    context = ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2, log_to_driver=False,
                       _system_config=LOCAL_SYSTEM_CONFIG)
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture
def job(tmp_path: Path) -> dict[str, Path]:
    program = tmp_path / "job.py"
    program.write_text(PROGRAM)
    rows = tmp_path / "rows.jsonl"
    lines = [json.dumps({"header": HEADERS[i % len(HEADERS)], "question": f"question {i}?"}) for i in range(ROWS)]
    lines[11] = json.dumps({"wrong_argument": 1})  # this row's program fails; the job goes on
    rows.write_text("\n".join(lines) + "\n")
    return {"program": program, "rows": rows, "out": tmp_path / "out.jsonl"}


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_each_row_once(out: Path) -> None:
    records = read_records(out)
    assert sorted(r["index"] for r in records) == list(range(ROWS))  # every row, none twice
    by_index = {r["index"]: r for r in records}
    assert "TypeError" in by_index[11]["error"]
    assert all(r["error"] is None and len(r["variables"]["answer"]) > 0 for i, r in by_index.items() if i != 11)
    assert by_index[5]["return"] == len("question 5?")


def test_job_survives_a_replica_killed_halfway(ray_address, job, llama_path):
    program = load_program(f"{job['program']}:answer")
    rows = [json.loads(line) for line in job["rows"].read_text().splitlines()]
    config = PoolConfig(replicas=2, router=RouterConfig(policy="round_robin"))
    pool = RayPool(llama_path, pool_config=config)
    killed_at: list[int] = []

    def kill_replica_0(written: int) -> None:
        if written == 60:  # halfway through, with rows in flight on both replicas
            before = pool.pool.replica_stats()[0]["replica_calls_finished"]
            ray.kill(pool.pool.actors[0], no_restart=True)
            killed_at.append(before)

    try:
        written, failed = run_job(program, pool, rows, job["out"], threads=8, progress=False, on_row_written=kill_replica_0)
        stats = pool.pool.replica_stats()
        per_replica_calls = list(pool.pool.calls_per_replica)
        retried = pool.pool.retried_calls
    finally:
        pool.shutdown()
    assert killed_at and killed_at[0] > 0, "replica 0 had served rows before it was killed"
    assert (written, failed) == (ROWS, 1)
    assert_each_row_once(job["out"])
    assert stats[0] is None and stats[1]["replica_calls_finished"] > ROWS - 60  # the survivor took the rest
    assert 0 in pool.pool.dead and per_replica_calls[0] < per_replica_calls[1]
    assert retried >= 1  # the calls in flight on the dead replica were re-sent, not recorded as errors


def test_killed_driver_resumes_without_losing_or_repeating_rows(ray_address, job, llama_path):
    command = [sys.executable, "-m", "sglite", "run", f"{job['program']}:answer", "--input", str(job["rows"]),
               "--output", str(job["out"]), "--model", str(llama_path), "--threads", "8", "--no-progress",
               "--ray", "--address", ray_address, "--replicas", "2"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if job["out"].exists() and len(job["out"].read_text().splitlines()) >= 40:
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    written_before = len(read_records(job["out"]))
    row_11_done = any(r["index"] == 11 for r in read_records(job["out"]))
    assert 40 <= written_before < ROWS, f"the driver should have been killed halfway ({proc.stderr.read()[-2000:]!r})"

    # The killed driver's replicas die with its Ray job; the rerun places new ones and skips written rows.
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == (0 if row_11_done else 1), finished.stderr[-3000:]  # 1: row 11 failed in this run
    assert f"{ROWS - written_before} rows written" in finished.stderr
    assert_each_row_once(job["out"])


def test_prefix_affinity_beats_round_robin_on_the_engines_cache_counters(ray_address, job, llama_path):
    program = load_program(f"{job['program']}:answer")
    rows = [{"header": HEADERS[i % len(HEADERS)], "question": f"question {i}?"} for i in range(49)]
    pool = RayPool(llama_path, replicas=2)
    hit_rate = {}
    groups_split = {}
    try:
        for policy in ("round_robin", "prefix"):
            pool.flush_cache()
            pool.pool.use_router(RouterConfig(policy=policy))
            before = pool.pool.replica_stats()
            placed: dict[str, set[int]] = {}
            original_choose = pool.pool.choose

            def choose(key: str, placed=placed, original_choose=original_choose) -> int:
                replica = original_choose(key)
                placed.setdefault(key[:40], set()).add(replica)
                return replica

            pool.pool.choose = choose
            out = job["out"].with_name(f"out-{policy}.jsonl")
            # One row at a time: which replica a row meets its prefix on decides the hit, not batch timing.
            assert run_job(program, pool, rows, out, threads=1, progress=False) == (49, 0)
            del pool.pool.choose
            after = pool.pool.replica_stats()
            hits = sum(a["cache_hit_tokens_total"] - b["cache_hit_tokens_total"] for a, b in zip(after, before))
            prompt = sum(a["prompt_tokens_total"] - b["prompt_tokens_total"] for a, b in zip(after, before))
            hit_rate[policy] = hits / prompt
            groups_split[policy] = sum(len(replicas) > 1 for replicas in placed.values())
            per_replica = [a["requests_total"] - b["requests_total"] for a, b in zip(after, before)]
            assert min(per_replica) >= 49 // 4, per_replica  # both replicas did real work under either policy
        # The same program through run_batch on the pool reads the same greedy answers as an in-process engine.
        distributed = program.run_batch(rows[:6], backend=pool)

        # A stream its reader abandons is aborted on its replica, not left generating.
        before = sum(s["generation_tokens_total"] for s in pool.pool.replica_stats())
        chunks = pool.pool.generate_stream({"prompt": "A long story:", "sampling_params": {"max_new_tokens": 1800, "ignore_eos": True}},
                                           key="A long story:")
        next(chunks), next(chunks)
        chunks.close()
        deadline = time.monotonic() + 60
        while any(s["num_running"] for s in pool.pool.replica_stats()) and time.monotonic() < deadline:
            time.sleep(0.1)
        stats = pool.pool.replica_stats()
        assert not any(s["num_running"] for s in stats)
        assert sum(s["generation_tokens_total"] for s in stats) - before < 1800
    finally:
        pool.shutdown()
    with sgl.Runtime(llama_path) as local:
        in_process = program.run_batch(rows[:6], backend=local)
    assert [s["answer"] for s in distributed] == [s["answer"] for s in in_process]
    assert groups_split["prefix"] == 0 and groups_split["round_robin"] == len(HEADERS)
    assert hit_rate["prefix"] > hit_rate["round_robin"] + 0.05, hit_rate


def test_a_replica_that_cannot_load_its_model_reports_why(ray_address, tmp_path):
    from sglite.runtime.cluster.pool import ReplicaPool

    with pytest.raises(OSError, match="does not exist"):  # the engine's own error, not "the actor died"
        ReplicaPool(str(tmp_path / "no-such-model"), PoolConfig(replicas=2))
    deadline = time.monotonic() + 60  # Ray frees a killed actor's CPU asynchronously
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2  # its replicas were released
