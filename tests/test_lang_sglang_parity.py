"""Frontend names SGLang programs use, on the tiny Llama checkpoint: gen(n=k), stop_regex, run(...) sampling
keywords, global_config, separate_reasoning, image/video refusal, Runtime(**server_args), backend queries."""

from __future__ import annotations

import re

import pytest

import sglite as sgl
from sglite.lang.reasoning import split_reasoning


@pytest.fixture(scope="module")
def backend(runtime):
    return runtime


def test_gen_n_samples_share_one_prefill_and_come_back_as_a_list(backend):
    @sgl.function
    def slogans(s, topic):
        s += "Write a slogan about " + topic + ":" + sgl.gen("slogan", max_tokens=6, n=4, temperature=1.0, ignore_eos=True)

    assert backend.flush_cache()
    before = backend.engine.get_stats()["prefill_tokens_computed"]
    state = slogans.run(topic="tea", backend=backend)
    samples = state["slogan"]
    assert isinstance(samples, list) and len(samples) == 4 and len(set(samples)) > 1
    assert state.text().endswith(samples[0])  # SGLang's shape: the first sample is appended
    metas = state.get_meta_info("slogan")
    prompt_tokens = metas[0]["prompt_tokens"]
    computed = backend.engine.get_stats()["prefill_tokens_computed"] - before
    assert computed == prompt_tokens + 3  # one prefill; the other samples compute only the last prompt token
    assert [m["completion_tokens"] for m in metas] == [6, 6, 6, 6]


def test_gen_n_greedy_samples_are_identical(backend):
    @sgl.function
    def greedy(s):
        s += "Once upon a time" + sgl.gen("x", max_tokens=8, n=3, temperature=0)

    plain = sgl.function(lambda s: s.__iadd__("Once upon a time" + sgl.gen("x", max_tokens=8, temperature=0)))
    samples = greedy.run(backend=backend)["x"]
    assert samples == [plain.run(backend=backend)["x"]] * 3


def test_gen_n_with_a_seed_is_reproducible(backend):
    @sgl.function
    def seeded(s):
        s += "Numbers:" + sgl.gen("x", max_tokens=6, n=3, temperature=1.0, ignore_eos=True)

    first = backend.engine.generate("Numbers:", {"max_new_tokens": 6, "n": 3, "seed": 11, "ignore_eos": True})
    second = backend.engine.generate("Numbers:", {"max_new_tokens": 6, "n": 3, "seed": 11, "ignore_eos": True})
    assert [o["text"] for o in first] == [o["text"] for o in second]
    assert len({o["text"] for o in first}) > 1
    assert len(seeded.run(backend=backend)["x"]) == 3


def test_gen_n_with_regex_every_sample_matches_then_select_runs_on_the_first(backend):
    pattern = r"[0-9]{3}-[a-z]{2}"

    @sgl.function
    def coded(s):
        s += "Code:" + sgl.gen("code", n=3, regex=pattern, temperature=1.0) + "\nOK? "
        s += sgl.select("ok", choices=["yes", "no"])

    state = coded.run(backend=backend)
    assert len(state["code"]) == 3 and all(re.fullmatch(pattern, c) for c in state["code"])
    assert state["ok"] in ("yes", "no")
    assert ("Code:" + state["code"][0] + "\nOK? " + state["ok"]) in state.text()


def test_run_n_keyword_applies_to_every_gen_and_run_batch(backend):
    @sgl.function
    def two(s, word):
        s += word + sgl.gen("a", max_tokens=3) + sgl.gen("b", max_tokens=3)

    state = two.run(word="x", n=2, temperature=0, backend=backend)
    assert len(state["a"]) == 2 and len(state["b"]) == 2
    states = two.run_batch([{"word": "p"}, {"word": "q"}], n=3, temperature=0, backend=backend)
    assert [len(st["a"]) for st in states] == [3, 3]
    assert states[0]["a"][0] == two.run(word="p", temperature=0, backend=backend)["a"]


def test_gen_n_refuses_streaming(backend):
    @sgl.function
    def many(s):
        s += "x" + sgl.gen("y", max_tokens=2, n=2)

    state = many.run(stream=True, backend=backend)
    with pytest.raises(sgl.LangError, match="cannot stream"):
        state.sync()


def test_gen_stop_regex_trims_at_the_match(backend):
    @sgl.function
    def free(s):
        s += "a b c" + sgl.gen("x", max_tokens=16, temperature=0, ignore_eos=True)

    text = free.run(backend=backend)["x"]
    first = text.lstrip()[0]

    @sgl.function
    def stopped(s):
        s += "a b c" + sgl.gen("x", max_tokens=16, temperature=0, ignore_eos=True, stop_regex=re.escape(first))

    state = stopped.run(backend=backend)
    assert state["x"] == text[: text.index(first)]
    assert state.get_meta_info("x")["finish_reason"]["type"] == "stop"


def test_dtype_int_uses_sglangs_regex_and_stops(backend):
    @sgl.function
    def number(s):
        s += "Count: " + sgl.gen("n", dtype=int, temperature=1.0, max_tokens=12)

    for _ in range(3):
        value = number.run(backend=backend)["n"]
        assert re.fullmatch(r"[-+]?[0-9]+", value), value  # trailing blanks are stop strings, trimmed


def test_global_config_default_backend_is_the_default_backend(backend):
    previous = sgl.get_default_backend()
    try:
        sgl.global_config.default_backend = backend
        assert sgl.get_default_backend() is backend
        sgl.set_default_backend(None)
        assert sgl.global_config.default_backend is None
    finally:
        sgl.set_default_backend(previous)


def test_skip_special_tokens_in_output_reaches_the_engine(backend):
    @sgl.function
    def raw(s):
        s += "x" + sgl.gen("y", max_tokens=4, temperature=0)

    params = sgl.gen("y", max_tokens=4).params
    try:
        sgl.global_config.skip_special_tokens_in_output = False
        assert backend._sampling_params(params)["skip_special_tokens"] is False
    finally:
        sgl.global_config.skip_special_tokens_in_output = True
    assert "skip_special_tokens" not in backend._sampling_params(params)


def test_image_and_video_are_refused_on_a_text_only_model(backend):
    @sgl.function
    def look(s):
        s += sgl.user(sgl.image("cat.png") + "What is this?")
        s += sgl.assistant(sgl.gen("answer", max_tokens=4))

    with pytest.raises(sgl.LangError, match="text-only"):
        look.run(backend=backend)

    @sgl.function
    def watch(s):
        s += sgl.video("clip.mp4", 4) + sgl.gen("answer", max_tokens=4)

    with pytest.raises(sgl.LangError, match="video"):
        watch.run(backend=backend)


def test_split_reasoning_markers():
    assert split_reasoning("<think>plan</think> done", "qwen3") == ("plan", "done")
    assert split_reasoning("no reasoning here", "qwen3") == ("", "no reasoning here")
    assert split_reasoning("plan</think>done", "deepseek-r1") == ("plan", "done")
    assert split_reasoning("<think>still thinking", None) == ("still thinking", "")
    with pytest.raises(sgl.LangError, match="model_type"):
        sgl.separate_reasoning(sgl.gen("x"), model_type="nope")


def test_separate_reasoning_splits_the_variable_and_the_text(backend):
    @sgl.function
    def think(s):
        s += "Q: 2+2?\nA:" + sgl.separate_reasoning(sgl.gen("answer", max_tokens=12, temperature=0), model_type="deepseek-r1")
        s += "|end"

    state = think.run(backend=backend)
    raw = backend.engine.generate("Q: 2+2?\nA:", {"max_new_tokens": 12, "temperature": 0})["text"]
    reasoning, answer = split_reasoning(raw, "deepseek-r1")  # no </think> in random text: all reasoning
    assert state["answer_reasoning_content"] == reasoning and state["answer"] == answer
    assert state.text() == "Q: 2+2?\nA:" + answer + "|end"


def test_backend_queries_sglang_programs_use(backend, llama_path):
    assert backend.get_model_name() == str(llama_path)
    assert backend.get_chat_template() is backend.chat_template
    assert backend.endpoint is backend
    info = sgl.get_server_info(backend)
    assert info["context_length"] == backend.engine.context_length and "chunked_prefill_size" in info


def test_runtime_maps_sglang_server_args(llama_path):
    runtime = sgl.Runtime(
        model_path=llama_path, context_length=64, chunked_prefill_size=16, schedule_policy="fcfs",
        disable_radix_cache=True, random_seed=5, log_level="error", mem_fraction_static=0.01,
        port=30000, trust_remote_code=True, tp_size=1, dtype="float32",
    )
    try:
        config = runtime.engine.config
        assert (runtime.engine.context_length, config.chunked_prefill_size, config.schedule_policy) == (64, 16, "fcfs")
        assert config.disable_radix_cache and config.random_seed == 5
        from sglite.lang.backends.server_args import pool_tokens_for_fraction

        assert runtime.engine.pool.size == pool_tokens_for_fraction(str(llama_path), 0.01, "float32", None)
    finally:
        runtime.shutdown()


@pytest.mark.parametrize(
    "args, named",
    [({"tp_size": 2}, "tp_size=2"), ({"schedule_policy": "dfs-weight"}, "schedule_policy"),
     ({"quantization": "fp8"}, "quantization"), ({"speculative_algorithm": "EAGLE"}, "speculative_algorithm"),
     ({"no_such_arg": 1}, "no_such_arg"), ({"mem_fraction_static": 1.5}, "mem_fraction_static")],
)
def test_runtime_refuses_server_args_it_cannot_honour_by_name(llama_path, args, named):
    with pytest.raises(sgl.UnsupportedServerArgError, match=re.escape(named)):
        sgl.Runtime(model_path=llama_path, **args)
