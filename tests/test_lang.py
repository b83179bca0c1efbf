"""The frontend language end to end through ``sgl.Runtime`` on the tiny Llama (noise text; structure asserted)."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from pydantic import BaseModel, Field

import sglite as sgl


@pytest.fixture(scope="module", autouse=True)
def default_backend(runtime):
    sgl.set_default_backend(runtime)
    yield runtime
    sgl.set_default_backend(None)


@sgl.function
def qa(s, question):
    s += "Question: " + question + "\nAnswer:"
    s += sgl.gen("answer", max_tokens=6, temperature=0, ignore_eos=True)


def test_gen_stores_variable_text_and_meta(runtime):
    state = qa.run(question="What is 2+2?")
    answer = state["answer"]
    assert isinstance(answer, str) and answer
    assert state.text() == "Question: What is 2+2?\nAnswer:" + answer
    meta = state.get_meta_info("answer")
    assert meta["completion_tokens"] == 6
    assert meta["prompt_tokens"] > 0 and meta["finish_reason"]["type"] == "length"


def test_gen_sends_the_whole_prompt_to_the_engine(runtime):
    state = qa.run(question="Why?")
    direct = runtime.engine.generate(
        "Question: Why?\nAnswer:", {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
    )
    assert state["answer"] == direct["text"]


def test_run_defaults_apply_and_gen_overrides_them(runtime):
    @sgl.function
    def two(s):
        s += "A:" + sgl.gen("short", ignore_eos=True) + "\nB:" + sgl.gen("long", max_tokens=5, ignore_eos=True)

    state = two.run(max_new_tokens=2, temperature=0)
    assert state.get_meta_info("short")["completion_tokens"] == 2
    assert state.get_meta_info("long")["completion_tokens"] == 5


def test_return_logprob_records_token_logprobs(runtime):
    @sgl.function
    def scored(s):
        s += "Hello" + sgl.gen("x", max_tokens=3, ignore_eos=True, return_logprob=True, top_logprobs_num=2)

    meta = scored.run(temperature=0).get_meta_info("x")
    assert len(meta["output_token_logprobs"]) == 3
    assert all(len(top) == 2 for top in meta["output_top_logprobs"])


@pytest.mark.parametrize(
    "make, check",
    [
        # SGLang's int/float regexes; their trailing blanks are stop strings, trimmed
        (lambda: sgl.gen_int("v", max_tokens=8), lambda v: re.fullmatch(r"[-+]?[0-9]+", v)),
        (lambda: sgl.gen("v", dtype=float, max_tokens=24), lambda v: re.fullmatch(r"[-+]?[0-9]*\.?[0-9]+", v)),
        (lambda: sgl.gen("v", dtype=bool, max_tokens=4), lambda v: v in ("True", "False")),
        (lambda: sgl.gen("v", regex=r"[a-c]{2}-[0-9]", max_tokens=8), lambda v: re.fullmatch(r"[a-c]{2}-[0-9]", v)),
    ],
)
def test_typed_and_regex_gen_outputs_match(runtime, make, check):
    @sgl.function
    def typed(s):
        s += "Value: " + make()

    value = typed.run(temperature=1.0)["v"]
    assert check(value), value


def test_gen_string_is_a_json_string_literal(runtime):
    @sgl.function
    def quoted(s):
        s += "Name: " + sgl.gen_string("v", max_tokens=24)

    state = quoted.run(temperature=1.0)
    value = state["v"]
    meta = state.get_meta_info("v")
    if meta["finish_reason"]["type"] == "stop":
        assert isinstance(json.loads(value), str)
    else:  # cut off by max_tokens: what was written is still the start of a valid JSON string literal
        assert meta["completion_tokens"] == 24
        assert re.fullmatch(r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*(?:\\(?:u[0-9a-fA-F]{0,3})?)?', value), value


class Person(BaseModel):
    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=120)


def test_json_schema_gen_parses_with_the_pydantic_model(runtime):
    @sgl.function
    def extract(s):
        s += "Person as JSON: " + sgl.gen("person", json_schema=Person, max_tokens=64)

    person = Person.model_validate_json(extract.run(temperature=1.0)["person"])
    assert 0 <= person.age <= 120


def test_chat_roles_render_with_the_tokenizers_template(runtime):
    @sgl.function
    def chat(s, question):
        s += sgl.system("Be brief.")
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=4, ignore_eos=True))
        with s.user():
            s += "And again?"
        s += sgl.assistant_begin() + sgl.gen("again", max_tokens=3) + sgl.assistant_end()

    state = chat.run(question="Hi")
    messages = state.messages()
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[2]["content"] == state["answer"] and messages[4]["content"] == state["again"]
    tokenizer = runtime.get_tokenizer()
    assert state.text() == tokenizer.apply_chat_template(messages, tokenize=False)


def test_streaming_yields_pieces_that_add_up_to_the_text(runtime):
    @sgl.function
    def story(s):
        s += "Once upon a time" + sgl.gen("story", max_tokens=8, ignore_eos=True)

    state = story.run(stream=True)
    pieces = list(state.text_iter())
    assert "".join(pieces) == state.text()
    var_pieces = list(state.text_iter("story"))
    assert len(var_pieces) > 1 and "".join(var_pieces) == state["story"]

    async def collect():
        return [p async for p in story.run(stream=True).text_async_iter("story")]

    assert len(asyncio.run(collect())) > 1


def test_fork_join_gathers_fork_variables_as_lists(runtime):
    @sgl.function
    def branches(s):
        s += "A long shared context about the weather in Paris and London today. " * 3
        forks = s.fork(3)
        forks += lambda i: f"Option {i}:" + sgl.gen("idea", max_tokens=3, ignore_eos=True)
        forks.join()

    state = branches.run()
    assert len(state["idea"]) == 3 and all(isinstance(idea, str) for idea in state["idea"])


def test_forks_report_cached_tokens_and_concatenate(runtime):
    @sgl.function
    def branches(s):
        s += "Shared context for all branches of this program. " * 3
        forks = s.fork(2)
        for i, f in enumerate(forks):
            f += f" Branch {i}:" + sgl.gen("b", max_tokens=2, ignore_eos=True)
        s["cached"] = [f.get_meta_info("b")["cached_tokens"] for f in forks]
        forks.join("concate_and_append")

    state = branches.run()
    assert all(c > 0 for c in state["cached"])
    assert " Branch 0:" in state.text() and " Branch 1:" in state.text()


def test_run_batch_keeps_input_order_and_hits_the_cache(runtime):
    @sgl.function
    def few_shot(s, n):
        s += "Examples: one is 1, two is 2, three is 3, four is 4, five is 5.\n" * 2
        s += f"Item {n} is" + sgl.gen("v", max_tokens=2, ignore_eos=True)

    states = few_shot.run_batch([{"n": i} for i in range(12)], num_threads=4, progress_bar=False)
    assert [st.text().split("Item ")[1].split(" ")[0] for st in states] == [str(i) for i in range(12)]
    assert sum(st.get_meta_info("v")["cached_tokens"] for st in states) > 0
    positional = few_shot.run_batch([(3,), (4,)])
    assert "Item 4 is" in positional[1].text()


def test_run_batch_reraises_a_failing_program(runtime):
    @sgl.function(num_api_spec_tokens=64)  # SGLang's decorator arguments are accepted
    def fragile(s, n):
        s += f"n={n}" + sgl.gen("v", max_tokens=1)
        if n == 2:
            raise ValueError(f"program {n} failed")

    with pytest.raises(ValueError, match="program 2 failed"):
        fragile.run_batch([{"n": i} for i in range(4)])


def test_bind_and_call(runtime):
    bound = qa.bind(question="Bound?")
    assert bound()["answer"] and "Bound?" in bound.run().text()
    with pytest.raises(TypeError, match="no parameter"):
        qa.bind(nope=1)


def test_var_scope_and_set_var(runtime):
    @sgl.function
    def scoped(s):
        with s.var_scope("intro"):
            s += "Hello " + sgl.gen(max_tokens=2, ignore_eos=True)
        s["note"] = "set by program"

    state = scoped.run()
    assert state.text().startswith(state["intro"]) and state["intro"].startswith("Hello ")
    assert state["note"] == "set by program" and "note" in state


def test_select_via_gen_choices(runtime):
    @sgl.function
    def pick(s):
        s += "The color is " + sgl.gen("color", choices=["red", "green", "blue"])

    state = pick.run()
    assert state["color"] in ("red", "green", "blue")
    assert len(state.get_meta_info("color")["normalized_prompt_logprobs"]) == 3


def test_errors_reraise_with_the_program_line(runtime):
    @sgl.function
    def bad_regex(s):
        s += "x" + sgl.gen("v", regex="(unclosed", max_tokens=4)

    with pytest.raises(ValueError) as info:
        bad_regex.run()
    assert any("test_lang.py" in note for note in getattr(info.value, "__notes__", []))

    @sgl.function
    def raises(s):
        s += "x"
        raise KeyError("from the program")

    with pytest.raises(KeyError, match="from the program"):
        raises.run()
    with pytest.raises(KeyError, match="from the program"):
        "".join(raises.run(stream=True).text_iter())
    with pytest.raises(KeyError, match="no variable 'missing'"):
        qa.run(question="q")["missing"]
    with pytest.raises(sgl.LangError, match="at most one"):
        sgl.gen("v", dtype=int, regex="[0-9]")


def test_run_without_backend_says_how_to_set_one():
    saved = sgl.get_default_backend()
    sgl.set_default_backend(None)
    try:
        with pytest.raises(sgl.BackendNotSetError, match="set_default_backend"):
            qa.run(question="q")
    finally:
        sgl.set_default_backend(saved)


def test_display_stream_prints_outside_notebooks(runtime, capsys):
    state = sgl.display_stream(qa.run(question="Printed?", stream=True))
    assert capsys.readouterr().out == state.text() + "\n"


def test_state_renders_html_with_variable_spans(runtime):
    html = qa.run(question="<b>")._repr_html_()
    assert 'title="answer"' in html and "&lt;b&gt;" in html


def test_sglang_signature_keywords_are_accepted(runtime):
    """Programs written for SGLang pass these keywords to gen/run/run_batch; they must run unchanged."""

    @sgl.function
    def scored(s, word):
        s += word + sgl.gen("x", max_tokens=3, n=1, ignore_eos=True, return_logprob=True, top_logprobs_num=2,
                            return_text_in_logprobs=True)

    meta = scored.run(word="Hello", temperature=0, use_thread=False).get_meta_info("x")
    tokenizer = runtime.get_tokenizer()
    assert [text for _, _, text in meta["output_token_logprobs"]] == [
        tokenizer.decode([tid]) for _, tid, _ in meta["output_token_logprobs"]
    ]
    assert all(text is not None for row in meta["output_top_logprobs"] for _, _, text in row)
    states = scored.run_batch([{"word": w} for w in ("a", "b", "c")], generator_style=True, temperature=0)
    assert not isinstance(states, list)
    assert [st.text()[0] for st in states] == ["a", "b", "c"]
    with pytest.raises(sgl.LangError, match="positive integer"):
        sgl.gen("x", n=0)
