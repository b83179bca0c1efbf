"""The engine against transformers: same greedy tokens, cache on or off, alone or batched."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import sglite

PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n",
    "class Parser:\n    def __init__(self, text):",
    "The quick brown fox",
    "for i in range(10):\n    print(i",
    '{"name": "Alice", "age":',
    "# Copyright",
    "x = [1, 2, 3]\ny = ",
]
GREEDY = {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True}


def hf_greedy(path, prompts, max_new_tokens=32):
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    outs = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        gen = model.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id
        )
        outs.append(gen[0, ids.shape[1] :].tolist())
    return outs


@pytest.fixture(scope="module")
def engine(llama_path):
    with sglite.Engine(str(llama_path), max_total_tokens=4096, chunked_prefill_size=64) as eng:
        yield eng


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_greedy_matches_transformers_batched(tiny_model_factory, family):
    path = tiny_model_factory(family)
    expected = hf_greedy(path, PROMPTS)
    with sglite.Engine(str(path), max_total_tokens=2048) as eng:
        got = eng.generate(PROMPTS, GREEDY)
        alone = [eng.generate(p, GREEDY) for p in PROMPTS[:2]]
        eng.check_invariant()
    assert [g["output_ids"] for g in got] == expected
    assert [a["output_ids"] for a in alone] == expected[:2]


def test_greedy_matches_transformers_cache_off_and_chunked(llama_path, engine):
    expected = hf_greedy(llama_path, PROMPTS[:4])
    with sglite.Engine(str(llama_path), disable_radix_cache=True, chunked_prefill_size=3) as off:
        assert [o["output_ids"] for o in off.generate(PROMPTS[:4], GREEDY)] == expected
        off.check_invariant()
    # cache on, twice: the second round hits the cache for every prompt
    first = engine.generate(PROMPTS[:4], GREEDY)
    second = engine.generate(PROMPTS[:4], GREEDY)
    assert [o["output_ids"] for o in first] == expected
    assert [o["output_ids"] for o in second] == expected
    assert all(o["meta_info"]["cached_tokens"] > 0 for o in second)


@pytest.mark.slow
def test_sentencepiece_model_matches_transformers(sentencepiece_path):
    expected = hf_greedy(sentencepiece_path, PROMPTS[:3], max_new_tokens=16)
    with sglite.Engine(str(sentencepiece_path)) as eng:
        got = eng.generate(PROMPTS[:3], {**GREEDY, "max_new_tokens": 16})
    assert [g["output_ids"] for g in got] == expected


def test_shared_prefix_is_computed_once(engine):
    tok = engine.tokenizer
    rng = random.Random(0)
    prefix = [rng.randrange(10, len(tok) - 10) for _ in range(220)]
    engine.generate(prefix + [11, 12, 13], {"max_new_tokens": 2})
    before = engine.get_stats()["prefill_tokens_computed"]
    out = engine.generate(prefix + [21, 22, 23, 24], {"max_new_tokens": 2})
    computed = engine.get_stats()["prefill_tokens_computed"] - before
    assert out["meta_info"]["cached_tokens"] >= 200
    assert computed == 224 - out["meta_info"]["cached_tokens"] <= 24


def test_logprobs_match_transformers(llama_path, engine):
    prompt = "def parse(self, text):"
    out = engine.generate(prompt, {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True},
                          return_logprob=True, top_logprobs_num=3, logprob_start_len=0)
    tok = AutoTokenizer.from_pretrained(llama_path)
    model = AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32)
    ids = tok(prompt).input_ids + out["output_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    n_prompt = out["meta_info"]["prompt_tokens"]
    for k, (lp, tid, _) in enumerate(out["meta_info"]["output_token_logprobs"]):
        assert tid == ids[n_prompt + k]
        assert lp == pytest.approx(logp[n_prompt + k - 1, tid].item(), abs=1e-4)
    inputs = out["meta_info"]["input_token_logprobs"]
    assert inputs[0][0] is None and [t for _, t, _ in inputs] == ids[:n_prompt]
    for pos in range(1, n_prompt):
        assert inputs[pos][0] == pytest.approx(logp[pos - 1, ids[pos]].item(), abs=1e-4)
    one = engine.generate(ids[:1], {"max_new_tokens": 1}, return_logprob=True, logprob_start_len=0)
    assert one["meta_info"]["input_token_logprobs"] == [(None, ids[0], None)]
    top = out["meta_info"]["output_top_logprobs"][0]
    assert [t for _, t, _ in top] == logp[n_prompt - 1].topk(3).indices.tolist()


def test_prompt_logprobs_from_a_cached_prefix(engine):
    """Scoring continuations (what `select` does) still works when the prefix is cached."""
    prefix = engine.tokenizer.encode("The answer is")
    engine.generate(prefix, {"max_new_tokens": 1})
    outs = engine.generate([prefix + [100, 101], prefix + [200]], {"max_new_tokens": 0},
                           return_logprob=True, logprob_start_len=len(prefix))
    assert [len(o["meta_info"]["input_token_logprobs"]) for o in outs] == [2, 1]
    # SGLang's contract: the token at logprob_start_len is reported without a logprob, the rest with one
    assert [o["meta_info"]["input_token_logprobs"][0][:2] for o in outs] == [(None, 100), (None, 200)]
    assert outs[0]["meta_info"]["input_token_logprobs"][1][0] < 0
    assert outs[0]["output_ids"] == [] and outs[0]["meta_info"]["finish_reason"]["type"] == "length"


def test_stop_conditions(engine):
    base = engine.generate("import os", {**GREEDY, "max_new_tokens": 24})
    text, ids = base["text"], base["output_ids"]
    stop_str = text[5:8]
    cut = engine.generate("import os", {**GREEDY, "max_new_tokens": 24, "stop": [stop_str]})
    assert cut["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_str}
    assert cut["text"] == text[: text.index(stop_str)]
    stop_id = ids[6]
    by_id = engine.generate("import os", {**GREEDY, "stop_token_ids": [stop_id]})
    assert by_id["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    assert by_id["output_ids"] == ids[: ids.index(stop_id) + 1]
    short = engine.generate("import os", {**GREEDY, "max_new_tokens": 5})
    assert short["output_ids"] == ids[:5] and short["meta_info"]["finish_reason"]["type"] == "length"
    eos = engine.tokenizer.eos_token_id
    with_min = engine.generate("import os", {"max_new_tokens": 12, "min_new_tokens": 12, "stop_token_ids": ids[:3],
                                             "temperature": 1.0, "seed": 3})
    assert len(with_min["output_ids"]) == 12 and not set(with_min["output_ids"]) & ({eos} | set(ids[:3]))


def test_streaming_concatenates_to_the_final_text(engine):
    chunks = list(engine.generate("class A:", {**GREEDY, "max_new_tokens": 16}, stream=True))
    whole = engine.generate("class A:", {**GREEDY, "max_new_tokens": 16})
    assert len(chunks) > 2 and chunks[-1]["finished"]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert [t for c in chunks for t in c["output_ids"]] == whole["output_ids"]


def test_seeded_sampling_is_reproducible_alone_or_batched(engine):
    params = {"max_new_tokens": 16, "temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": 1234}
    alone = engine.generate("def f(x):", params)["output_ids"]
    batched = engine.generate(["x = 1", "def f(x):", "import re"], [{"max_new_tokens": 8}, params, {"max_new_tokens": 4}])
    assert batched[1]["output_ids"] == alone
    other = engine.generate("def f(x):", {**params, "seed": 99})["output_ids"]
    assert other != alone


def test_repetition_penalty_matches_transformers_processor():
    from transformers import RepetitionPenaltyLogitsProcessor

    from sglite.runtime.sampler import apply_penalties
    from sglite.runtime.sampling_params import SamplingParams

    torch.manual_seed(0)
    logits = torch.randn(2, 50)
    seen = torch.tensor([3, 7, 7, 20])
    expected = RepetitionPenaltyLogitsProcessor(1.7)(seen.unsqueeze(0), logits[:1].clone())
    got = apply_penalties(logits.clone(), [SamplingParams(repetition_penalty=1.7), SamplingParams()],
                          [seen, seen], [seen, seen])
    assert torch.allclose(got[0], expected[0]) and torch.equal(got[1], logits[1])
    freq = apply_penalties(logits.clone(), [SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)],
                           [seen], [seen])
    assert freq[0, 7] == pytest.approx(logits[0, 7].item() - 2 * 0.5 - 0.25)
    assert freq[0, 1] == logits[0, 1]


def test_penalties_reach_the_engine(engine):
    prompt_ids = engine.tokenizer.encode("a a a a b b b b")
    out = engine.generate(prompt_ids, {**GREEDY, "max_new_tokens": 32, "repetition_penalty": 100.0})["output_ids"]
    assert len(set(out)) == len(out) and not set(out) & set(prompt_ids)
    out = engine.generate(prompt_ids, {**GREEDY, "max_new_tokens": 32, "presence_penalty": 2.0,
                                       "frequency_penalty": 2.0})
    assert out["meta_info"]["completion_tokens"] == 32


@pytest.mark.parametrize(
    "prompt, params, field",
    [
        ("", None, "prompt"),
        ([], None, "prompt"),
        ("x " * 5000, None, "context length"),
        ("hi", {"max_new_tokens": -1}, "max_new_tokens"),
        ("hi", {"temprature": 0.5}, "temprature"),
        ("hi", {"top_p": 0}, "top_p"),
        ("hi", {"temperature": "hot"}, "temperature"),
        ("hi", {"stop": [1, 2]}, "stop"),
        ("hi", {"min_new_tokens": 5, "max_new_tokens": 2}, "min_new_tokens"),
        ([10**9], None, "vocabulary"),
    ],
)
def test_bad_input_is_a_clear_error_and_the_engine_keeps_serving(engine, prompt, params, field):
    with pytest.raises(ValueError, match=field):
        engine.generate(prompt, params)
    assert engine.generate("ok", {"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2
    engine.check_invariant()


def test_unknown_engine_option_is_an_error(llama_path):
    with pytest.raises(ValueError, match="max_total_tokenz"):
        sglite.Engine(str(llama_path), max_total_tokenz=10)


@pytest.mark.slow
def test_tiny_pool_evicts_and_preempts_but_completes_everything(llama_path):
    prompts = [f"def function_{i}(argument):\n    return argument * {i}" for i in range(12)]
    expected = hf_greedy(llama_path, prompts, max_new_tokens=24)
    # 12 requests x ~40 tokens in a 160-slot pool: eviction and preemption must both happen
    with sglite.Engine(str(llama_path), max_total_tokens=160, chunked_prefill_size=32) as eng:
        got = eng.generate(prompts, {**GREEDY, "max_new_tokens": 24})
        stats = eng.get_stats()
        eng.check_invariant()
    assert [g["output_ids"] for g in got] == expected
    assert stats["preemptions"] > 0
    assert stats["evicted_tokens_total"] > 0  # finished requests' cached KV made room for later ones
    assert stats["pool_free"] + stats["cached_tokens_in_tree"] == stats["pool_size"]


@pytest.mark.slow
def test_fuzzed_concurrent_workload_keeps_the_slot_invariant(llama_path):
    import threading

    rng = random.Random(7)
    vocab = 2000
    stems = [[rng.randrange(10, vocab) for _ in range(rng.randrange(5, 60))] for _ in range(4)]
    with sglite.Engine(str(llama_path), max_total_tokens=400, chunked_prefill_size=48, max_running_requests=6) as eng:
        errors = []

        def client(seed):
            r = random.Random(seed)
            for _ in range(6):
                prompt = r.choice(stems)[: r.randrange(1, 60)] + [r.randrange(10, vocab) for _ in range(r.randrange(1, 20))]
                params = {"max_new_tokens": r.randrange(0, 20), "temperature": r.choice([0, 1.0])}
                try:
                    if r.random() < 0.2:
                        for i, _ in enumerate(eng.generate(prompt, params, stream=True)):
                            if i == 2:
                                break  # abandon the stream: the request is aborted
                    else:
                        out = eng.generate(prompt, params)
                        assert len(out["output_ids"]) <= params["max_new_tokens"]
                except Exception as exc:  # pragma: no cover - reported below
                    errors.append(exc)

        threads = [threading.Thread(target=client, args=(s,)) for s in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert eng.wait_idle(timeout=60)  # abandoned streams' aborts have landed
        eng.check_invariant()
        stats = eng.get_stats()
        assert stats["pool_free"] + stats["cached_tokens_in_tree"] == stats["pool_size"]


def test_flush_cache_only_when_idle_and_shutdown_is_final(llama_path):
    from sglite.runtime.engine import EngineShutdownError

    eng = sglite.Engine(str(llama_path))
    eng.generate("import os", {"max_new_tokens": 2})
    assert eng.get_stats()["cached_tokens_in_tree"] > 0
    stream = eng.generate("import os", {"max_new_tokens": 200, "ignore_eos": True}, stream=True)
    next(stream)
    assert eng.flush_cache() is False  # a running request holds KV
    stream.close()  # abandoning the stream aborts the request
    assert eng.wait_idle(timeout=30)
    assert eng.flush_cache() is True and eng.get_stats()["cached_tokens_in_tree"] == 0
    eng.check_invariant()
    eng.shutdown()
    with pytest.raises(EngineShutdownError):
        eng.generate("x")


def test_num_threads_option_applies_to_forwards_only(llama_path):
    before = torch.get_num_threads()
    seen: list[int] = []
    with sglite.Engine(str(llama_path), num_threads=1) as eng:
        forward = eng.runner.model.forward
        eng.runner.model.forward = lambda *args: (seen.append(torch.get_num_threads()), forward(*args))[1]
        assert eng.generate("x", {"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2
        assert torch.get_num_threads() == before  # the caller's setting is untouched
    assert seen and set(seen) == {1}
    with pytest.raises(ValueError, match="num_threads"):
        sglite.Engine(str(llama_path), num_threads=0)


def test_request_ids_must_be_unique_while_in_flight(engine):
    with pytest.raises(ValueError, match="unique"):
        engine.generate(["a", "b"], {"max_new_tokens": 1}, rid=["x", "x"])
    with pytest.raises(ValueError, match="one per prompt"):
        engine.generate(["a", "b"], {"max_new_tokens": 1}, rid=["x"])
    stream = engine.generate("a", {"max_new_tokens": 100, "ignore_eos": True}, stream=True, rid="busy")
    next(stream)
    with pytest.raises(ValueError, match="in flight"):
        engine.generate("b", {"max_new_tokens": 1}, rid="busy")
    stream.close()  # the abort lands on the step loop; wait_idle returns once it has released the id
    assert engine.wait_idle(timeout=30)
    out = engine.generate("b", {"max_new_tokens": 1}, rid="busy")
    assert out["meta_info"]["id"] == "busy"


def test_an_empty_prompt_list_is_an_empty_batch_everywhere(engine):
    # One rule (sglite.runtime.prompts): [] is a batch of no prompts, refused as such, as text or as ids.
    with pytest.raises(ValueError, match="list of prompts is empty"):
        engine.generate([], {"max_new_tokens": 1})
    with pytest.raises(ValueError, match="list of prompts is empty"):
        engine.generate(input_ids=[], sampling_params={"max_new_tokens": 1})


@pytest.mark.slow
def test_decoding_requests_take_their_slots_in_runs_with_unchanged_output(llama_path, monkeypatch):
    prompts = [[5, 9, 40, 7] * (2 + i) for i in range(6)]  # decoded together, step by step
    params = {"max_new_tokens": 40, "temperature": 0, "ignore_eos": True}
    steps: list[torch.Tensor] = []  # every decode row's slot list, in order

    def decoded_slots() -> list[torch.Tensor]:
        final = {s.numel(): s for s in steps}  # the last list of each length: a sequence's final step
        steps.clear()
        return [final[len(p) + 39][len(p) :] for p in prompts]  # the KV of its 39 computed output tokens

    def adjacency(runs: list[torch.Tensor]) -> float:  # neighbouring positions in neighbouring slots
        return float(torch.cat([(r.diff() == 1).float() for r in runs]).mean())

    with sglite.Engine(str(llama_path), dtype="float32", max_total_tokens=4096) as engine:
        forward = engine.scheduler.forward

        def recording(batch, rows):
            steps.extend(s.clone() for s, n in zip(batch.kv_slots, batch.extend_lens) if n == 1)
            return forward(batch, rows)

        monkeypatch.setattr(engine.scheduler, "forward", recording)
        in_runs = engine.generate(input_ids=prompts, sampling_params=params)
        engine.check_invariant()  # spare slots of a run went back to the pool with the request
        runs = adjacency(decoded_slots())
    # one slot a step would interleave the six sequences (adjacency ~0); the tokens are transformers'
    assert runs > 0.9
    model = AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32)
    for prompt, out in zip(prompts, in_runs):
        ids = torch.tensor([prompt])
        expected = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt) :]
        assert out["output_ids"] == expected.tolist()


def test_a_request_held_back_for_memory_gets_the_slots_decoders_took_ahead(llama_path):
    from sglite.runtime.scheduler import DECODE_HEADROOM

    prompt = [5, 9, 40, 7] * 2
    params = {"max_new_tokens": 250, "temperature": 0, "ignore_eos": True}
    with sglite.Engine(str(llama_path), dtype="float32", max_total_tokens=320, disable_radix_cache=True) as engine:
        decoded, second, running_then = 0, None, None
        for chunk in engine.generate(input_ids=prompt, sampling_params=params, stream=True):
            decoded += len(chunk["output_ids"])
            stats = engine.get_stats()  # the only request holds every used slot (no radix cache)
            spare = stats["pool_size"] - stats["pool_free"] - (len(prompt) + decoded)
            if second is None and spare >= 40:
                # one slot more than is free: it fits only if the decoder gives back the slots it took ahead
                # (it still has them unless it decodes 40 tokens before this request is admitted)
                length = stats["pool_free"] - 2 * DECODE_HEADROOM + 1
                second = engine.generate(input_ids=[7] * length, sampling_params={"max_new_tokens": 1})
                running_then = engine.get_stats()["num_running"]  # held back, it would run after the first ended
        engine.check_invariant()
    assert decoded == 250 and len(second["output_ids"]) == 1
    assert running_then == 1  # the first was still decoding when the second had finished


def test_a_batch_reaches_the_step_loop_whole(llama_path, monkeypatch):
    """generate(list) queues its requests as one message: the first step sees all of them, however the
    caller's and the loop's threads interleave (else a partial first batch changes the schedule, and with
    enable_torch_compile which batch sizes compile)."""
    import threading

    from sglite.runtime.scheduler import Scheduler

    seen: list[int] = []
    stepped = threading.Event()
    real_step = Scheduler.step

    def step(self):
        if self.waiting or self.running:
            seen.append(len(self.waiting) + len(self.running))
            stepped.set()
        real_step(self)

    monkeypatch.setattr(Scheduler, "step", step)
    with sglite.Engine(str(llama_path)) as engine:
        real_put = engine._inbox.put

        def put(msg, *args, **kwargs):
            real_put(msg, *args, **kwargs)
            if msg[0] == "add":
                stepped.wait(5)  # a loop that would step on part of the batch has done so by now

        monkeypatch.setattr(engine._inbox, "put", put)
        prompts = [[1 + i, 2, 3, 4 + i] for i in range(6)]
        outs = engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": 2, "temperature": 0})
    assert [len(o["output_ids"]) for o in outs] == [2] * 6
    assert seen[0] == 6
