"""No request can hurt another at the engine level: hostile sampling parameters, a failing batch,
quadratic streams, and every way a caller could be left waiting (issue 9, items 1, 2, 5, 8, 10)."""

from __future__ import annotations

import json
import threading

import pytest
import torch

import sglite
from sglite.runtime.engine import EngineShutdownError, RequestFailedError

VICTIM = {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}

HOSTILE_PARAMS = [
    {"temperature": 1e-38},
    {"temperature": 5e-38, "top_p": 1e-30},
    {"temperature": 1.0, "repetition_penalty": 1e-40},
    {"temperature": 1e-30, "repetition_penalty": 1e-40, "min_p": 1.0},
    {"temperature": 2.0, "repetition_penalty": 100.0, "frequency_penalty": 2.0, "presence_penalty": -2.0},
    {"temperature": 1.0, "top_k": 1, "min_p": 1.0, "top_p": 1e-45},
]


@pytest.fixture(scope="module")
def engine(llama_path):
    with sglite.Engine(str(llama_path), max_total_tokens=8192, max_running_requests=32) as engine:
        yield engine


def victims_alone(engine, prompts: list[str]) -> list[list[int]]:
    return [engine.generate(p, VICTIM)["output_ids"] for p in prompts]


def run_victims_with(engine, prompts: list[str], hostile: list[tuple[str, dict]]) -> tuple[list[list[int]], list]:
    """Stream the victims while the hostile requests run; (victims' ids, each hostile result or exception)."""
    outputs: list[list[int]] = [[] for _ in prompts]
    hostile_results: list = [None] * len(hostile)
    started = threading.Barrier(len(prompts) + len(hostile))

    def victim(i: int) -> None:
        started.wait()
        for chunk in engine.generate(prompts[i], VICTIM, stream=True):
            outputs[i].extend(chunk["output_ids"])

    def attacker(j: int) -> None:
        started.wait()
        prompt, params = hostile[j]
        try:
            hostile_results[j] = engine.generate(prompt, {"max_new_tokens": 24, **params})
        except Exception as exc:
            hostile_results[j] = exc

    threads = [threading.Thread(target=victim, args=(i,)) for i in range(len(prompts))]
    threads += [threading.Thread(target=attacker, args=(j,)) for j in range(len(hostile))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a request was left waiting"
    return outputs, hostile_results


PROMPTS = [f"victim number {i} says" for i in range(8)]


@pytest.mark.slow
def test_hostile_sampling_parameters_hurt_nobody(engine):
    expected = victims_alone(engine, PROMPTS)
    hostile = [(f"attacker {j}", p) for j, p in enumerate(HOSTILE_PARAMS)]
    outputs, results = run_victims_with(engine, PROMPTS, hostile)
    assert outputs == expected  # same greedy tokens as alone: nothing leaked across rows
    for params, result in zip(HOSTILE_PARAMS, results):
        assert isinstance(result, dict), (params, result)  # safe sampling: every accepted parameter generates
        assert result["meta_info"]["completion_tokens"] >= 1
    assert engine.get_stats()["requests_failed"] == 0
    engine.check_invariant()


def test_tiny_temperature_is_greedy(engine):
    greedy = engine.generate("the same", {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True})["output_ids"]
    tiny = engine.generate("the same", {"max_new_tokens": 12, "temperature": 1e-38, "ignore_eos": True})["output_ids"]
    assert tiny == greedy


def test_all_stop_tokens_with_min_new_tokens_is_refused(engine):
    vocab = engine.runner.model.vocab_size
    with pytest.raises(ValueError, match="whole vocabulary"):
        engine.generate("x", {"max_new_tokens": 4, "min_new_tokens": 2, "stop_token_ids": list(range(vocab))})
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate("x", {"max_new_tokens": 4, "stop_token_ids": [vocab + 5]})
    # Every token but one is a stop token: the one left is generated until min_new_tokens, then it may stop.
    free = next(t for t in range(vocab - 1, -1, -1) if t not in engine.eos_token_ids)
    stops = [t for t in range(vocab) if t != free]
    out = engine.generate("x", {"max_new_tokens": 6, "min_new_tokens": 3, "temperature": 1.0, "stop_token_ids": stops})
    assert out["output_ids"][:3] == [free, free, free]


def test_a_failing_batch_ends_only_the_request_that_caused_it(engine, monkeypatch):
    """A forward that raises for one request's tokens is bisected down to that request; the rest continue."""
    expected = victims_alone(engine, PROMPTS)
    used = {t for ids in expected for t in ids} | {t for p in PROMPTS for t in engine.tokenizer.encode(p)}
    poison = next(t for t in range(engine.runner.model.vocab_size - 1, 0, -1) if t not in used)
    forward = engine.scheduler.forward

    def flaky_forward(batch, rows):
        if poison in batch.input_ids.tolist():
            raise RuntimeError("device-side assert triggered")
        return forward(batch, rows)

    before = engine.get_stats()
    monkeypatch.setattr(engine.scheduler, "forward", flaky_forward)
    outputs, results = run_victims_with(engine, PROMPTS, [([poison] * 3, {"temperature": 0})])
    monkeypatch.setattr(engine.scheduler, "forward", forward)
    assert outputs == expected
    assert isinstance(results[0], RequestFailedError) and "device-side assert" in results[0].detail
    stats = engine.get_stats()
    assert stats["requests_failed"] == before["requests_failed"] + 1
    engine.check_invariant()


def test_a_failing_processor_ends_only_its_request(engine, monkeypatch):
    """A sampler failure in one row (here: the batched sampler raising) falls back to per-row sampling."""
    import sglite.runtime.token_selection as scheduler_module

    real_sample = scheduler_module.sample

    def sample_failing_on_hot_rows(logits, params, generators):
        if any(sp.temperature == 1.5 for sp in params):
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real_sample(logits, params, generators)

    expected = victims_alone(engine, PROMPTS)
    monkeypatch.setattr(scheduler_module, "sample", sample_failing_on_hot_rows)
    outputs, results = run_victims_with(engine, PROMPTS, [("attacker", {"temperature": 1.5})])
    monkeypatch.setattr(scheduler_module, "sample", real_sample)
    assert outputs == expected
    assert isinstance(results[0], RequestFailedError)
    engine.check_invariant()


def test_stream_chunks_carry_logprob_deltas(engine):
    params = {"max_new_tokens": 40, "temperature": 0, "ignore_eos": True}
    whole = engine.generate("deltas", params, return_logprob=True, top_logprobs_num=5, logprob_start_len=0)
    chunks = list(engine.generate("deltas", params, stream=True, return_logprob=True, top_logprobs_num=5, logprob_start_len=0))
    joined = [e for c in chunks for e in c["meta_info"]["output_token_logprobs"]]
    tops = [e for c in chunks for e in c["meta_info"]["output_top_logprobs"]]
    inputs = [e for c in chunks for e in c["meta_info"]["input_token_logprobs"]]
    assert len(joined) == len(tops) == 40
    assert [t for _, t, _ in joined] == whole["output_ids"]
    assert [lp for lp, _, _ in joined] == pytest.approx([lp for lp, _, _ in whole["meta_info"]["output_token_logprobs"]], abs=1e-4)
    assert len(inputs) == len(whole["meta_info"]["input_token_logprobs"]) == whole["meta_info"]["prompt_tokens"]


def streamed_bytes(engine, tokens: int) -> int:
    params = {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True}
    chunks = engine.generate("bytes", params, stream=True, return_logprob=True, top_logprobs_num=20)
    return sum(len(json.dumps({k: v for k, v in c.items() if k != "meta_info"} | {"meta": {k: v for k, v in c["meta_info"].items() if k != "e2e_latency"}})) for c in chunks)


def test_streamed_bytes_grow_linearly_with_tokens(engine):
    small, large = streamed_bytes(engine, 50), streamed_bytes(engine, 200)
    assert large < 4.4 * small, (small, large)  # cumulative lists would make this ~16x


def test_prompt_type_and_length_errors_are_value_errors(engine, monkeypatch):
    with pytest.raises(ValueError, match="prompt must be"):
        engine.generate(123, {"max_new_tokens": 1})
    calls = []
    encode = engine.tokenizer.encode
    monkeypatch.setattr(engine.inputs.tokenizer, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    huge = "x" * (engine.context_length * engine.inputs.max_chars_per_token + 1)
    with pytest.raises(ValueError, match="over the context length"):
        engine.generate(huge, {"max_new_tokens": 1})
    assert calls == []  # refused by the character bound, never tokenized


def test_failure_submitting_the_second_prompt_aborts_the_first(engine):
    long = {"max_new_tokens": 1500, "ignore_eos": True, "temperature": 0}
    busy = engine.generate("occupied", long, stream=True, rid="busy")
    next(busy)
    with pytest.raises(ValueError, match="already used"):
        engine.generate(["first", "second"], long, rid=["fresh", "busy"])
    done = threading.Event()

    def idle_but_one():
        import time

        while engine.get_stats()["num_running"] + engine.get_stats()["num_waiting"] > 1:
            time.sleep(0.02)
        done.set()

    threading.Thread(target=idle_but_one, daemon=True).start()
    assert done.wait(30), "the first prompt kept running with nobody reading it"
    busy.close()  # aborts "busy"


def test_calls_after_shutdown_raise_instead_of_waiting(llama_path):
    engine = sglite.Engine(str(llama_path), max_total_tokens=2048)
    engine.shutdown()
    for call in (engine.flush_cache, engine.check_invariant, lambda: engine.generate("x", {"max_new_tokens": 1})):
        result: list = []
        worker = threading.Thread(target=lambda: result.append(_raises(call)))
        worker.start()
        worker.join(timeout=10)
        assert not worker.is_alive(), "a call after shutdown hung"
        assert isinstance(result[0], EngineShutdownError)


def _raises(call):
    try:
        call()
    except Exception as exc:
        return exc
    return None


def test_requests_racing_with_shutdown_are_all_answered(llama_path):
    engine = sglite.Engine(str(llama_path), max_total_tokens=4096)
    answers: list = []
    start = threading.Barrier(17)

    def submit(i: int) -> None:
        start.wait()
        try:
            answers.append(engine.generate(f"race {i}", {"max_new_tokens": 200, "ignore_eos": True}))
        except EngineShutdownError as exc:
            answers.append(exc)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    start.wait()
    engine.shutdown()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive(), "a request racing with shutdown was never answered"
    assert len(answers) == 16


def test_streaming_program_error_is_never_lost(runtime):
    import sglite as sgl

    @sgl.function
    def broken(s):
        s += "text"
        raise KeyError("boom")

    lost = 0
    for _ in range(300):
        state = broken.run(stream=True, backend=runtime)
        try:
            list(state.text_iter())
            lost += 1
        except KeyError:
            pass
    assert lost == 0


def test_streamed_gen_keeps_the_whole_logprob_lists(runtime):
    import sglite as sgl

    @sgl.function
    def scored(s):
        s += "Hello" + sgl.gen("out", max_tokens=12, temperature=0, ignore_eos=True, return_logprob=True)

    state = scored.run(stream=True, backend=runtime)
    list(state.text_iter())
    meta = state.get_meta_info("out")
    assert meta["completion_tokens"] == 12 and len(meta["output_token_logprobs"]) == 12


def test_a_failed_prompt_of_a_batch_aborts_the_rest(engine, monkeypatch):
    poison = engine.runner.model.vocab_size - 1
    forward = engine.scheduler.forward

    def flaky_forward(batch, rows):
        if poison in batch.input_ids.tolist():
            raise RuntimeError("broken")
        return forward(batch, rows)

    before = engine.get_stats()["generation_tokens_total"]
    monkeypatch.setattr(engine.scheduler, "forward", flaky_forward)
    with pytest.raises(RequestFailedError):
        engine.generate([[poison] * 3, "a long healthy one"], {"max_new_tokens": 1500, "ignore_eos": True, "temperature": 0})
    monkeypatch.setattr(engine.scheduler, "forward", forward)
    idle = threading.Event()

    def watch():
        import time

        while engine.get_stats()["num_running"] + engine.get_stats()["num_waiting"]:
            time.sleep(0.02)
        idle.set()

    threading.Thread(target=watch, daemon=True).start()
    assert idle.wait(30)
    # Aborted as soon as the first failed, not run to its 1500 tokens with nobody reading.
    assert engine.get_stats()["generation_tokens_total"] - before < 1000
    engine.check_invariant()
