"""Idle OpenMP workers (``runtime/openmp_workers.py``): releasing frees the calling thread's pool for real
(its worker threads exit), and the engine releases both the caller's pool when a request is submitted and
its own step loop's pool when it runs out of work."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest
import torch

import sglite
from sglite.runtime import engine as engine_module
from sglite.runtime.kernels.openmp_workers import release_idle_workers

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or "OpenMP" not in torch.__config__.parallel_info() or (os.cpu_count() or 1) < 2,
    reason="needs Linux (/proc), torch's OpenMP backend and two CPUs",
)


def thread_ids() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def in_fresh_thread(fn):
    """Run ``fn`` on a new thread (its own OpenMP pool, none yet) and return its result."""
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(value=fn()))
    worker.start()
    worker.join()
    return out["value"]


def gone_within(ids: set[int], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while ids & thread_ids():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def make_pool() -> set[int]:
    """Open a 2-thread parallel region on this thread; the thread ids its OpenMP pool added."""
    torch.set_num_threads(2)
    before = thread_ids()
    torch.ones(1 << 22).exp_()  # far past ATen's grain size: one parallel region over both threads
    return thread_ids() - before


def test_release_frees_the_calling_threads_idle_workers():
    def body():
        workers = make_pool()
        again = make_pool()  # the pool is kept between regions (what slows another thread's team)
        released = release_idle_workers()
        return workers, again, released, gone_within(workers)

    workers, again, released, gone = in_fresh_thread(body)
    assert len(workers) == 1 and not again  # one worker beside the calling thread, reused
    assert released and gone  # the worker thread exited


def test_the_engine_releases_the_callers_pool_and_its_own_when_idle(llama_path, monkeypatch):
    calls: list[str] = []
    engine_idle = threading.Event()

    def recording():
        name = threading.current_thread().name
        calls.append(name)
        if name == "sglite-engine":
            engine_idle.set()
        return release_idle_workers()

    monkeypatch.setattr(engine_module, "release_idle_workers", recording)
    with sglite.Engine(str(llama_path), num_threads=2) as engine:

        def body():
            workers = make_pool()
            out = engine.generate(input_ids=[[1, 2, 3, 4]], sampling_params={"max_new_tokens": 4, "temperature": 0})
            return workers, out, threading.current_thread().name, gone_within(workers)

        workers, out, caller, gone = in_fresh_thread(body)
        assert len(out[0]["output_ids"]) == 4
        assert len(workers) == 1 and gone  # the caller's idle worker was released when it submitted
        assert caller in calls
        assert engine_idle.wait(10)  # the step loop gave back its own pool once out of work
