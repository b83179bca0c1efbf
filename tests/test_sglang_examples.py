"""Our own programs modelled on SGLang's ``examples/frontend_language`` (choices_logprob, json_logprobs,
cot_decoding, json_decode, multi_stage_fork, parallel_sample, sgl_gen_min_tokens, streaming,
readme_examples), each run twice on the tiny Llama checkpoint:

- in process, ``sgl`` = ``sglite`` with ``sgl.Runtime``;
- through SGLang 0.5.23's own frontend (``sgl`` = ``sglang``) and its ``RuntimeEndpoint`` on ``sglite serve``.

Each program asserts what SGLang's example relies on, and returns a summary of its greedy results: the
two runs must agree (same model, same numbers, whichever client drives it).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from typing import Annotated, Any

import pytest
from pydantic import BaseModel, Field, StringConstraints

import sglite
from sglite.runtime.server.testing import serve_subprocess

sglang = pytest.importorskip("sglang", reason="needs the compat extra (sglang==0.5.23)")

CHAT_TEMPLATE = "chatml"  # SmolLM2's; SGLang guesses "default" from the path (docs/compatibility.md)


@pytest.fixture(scope="module")
def tiny_runtime(llama_path):
    runtime = sglite.Runtime(llama_path, chat_template=CHAT_TEMPLATE)
    yield runtime
    runtime.shutdown()


@pytest.fixture(scope="module")
def tiny_server(llama_path):
    with serve_subprocess(["--model", str(llama_path), "--max-total-tokens", "16384"]) as url:
        yield url


@contextmanager
def sglite_backend(runtime: sglite.Runtime) -> Iterator[Any]:
    previous = sglite.get_default_backend()
    sglite.set_default_backend(runtime)
    try:
        yield sglite
    finally:
        sglite.set_default_backend(previous)


@contextmanager
def sglang_backend(url: str) -> Iterator[Any]:
    previous = sglang.global_config.default_backend
    sglang.set_default_backend(sglang.RuntimeEndpoint(url, chat_template_name=CHAT_TEMPLATE))
    try:
        yield sglang
    finally:
        sglang.global_config.default_backend = previous


def raw_text(state: Any) -> str:
    """What SGLang's cot_decoding.py does to print a state: slice ``str(state)``."""
    return str(state)[len("ProgramState(") : -1]


# ---- the programs ------------------------------------------------------------------------------


def choices_logprob(sgl) -> dict:
    @sgl.function
    def tool_use(s, question):
        s += "To answer this question: " + question + ", "
        s += "I need to use a " + sgl.gen("tool", choices=["calculator", "search engine"]) + ". "

    state = tool_use.run(question="What is 5 + 5?")
    meta = state.get_meta_info("tool")
    assert state["tool"] in ("calculator", "search engine")
    normalized = meta["normalized_prompt_logprobs"]
    for entries, score in zip(meta["input_token_logprobs"], normalized):
        assert all(isinstance(text, str) for _, _, text in entries)  # SGLang's entries carry the token text
        values = [lp for lp, _, _ in entries if lp is not None]
        assert score == pytest.approx(sum(values) / len(values))
    assert state["tool"] == ["calculator", "search engine"][max(range(2), key=normalized.__getitem__)]
    return {"tool": state["tool"], "normalized": normalized,
            "entries": [[(tid, text) for _, tid, text in e] for e in meta["input_token_logprobs"]]}


def json_logprobs(sgl) -> dict:
    regex = r'\{"name": "[a-z]{1,8}", "house": "(Gryffindor|Slytherin|Ravenclaw|Hufflepuff)"\}'

    @sgl.function
    def character(s, name):
        s += name + " is a character in Harry Potter. Fill in the JSON.\n"
        s += sgl.gen("json", max_tokens=64, temperature=0, regex=regex, return_logprob=True, logprob_start_len=0,
                     top_logprobs_num=3, return_text_in_logprobs=True)

    state = character.run(name="Hermione Granger")
    meta = state.get_meta_info("json")
    assert re.fullmatch(regex, state["json"])
    assert len(meta["input_token_logprobs"]) == len(meta["input_top_logprobs"]) == meta["prompt_tokens"]
    assert len(meta["output_token_logprobs"]) == len(meta["output_top_logprobs"]) == meta["completion_tokens"]
    assert meta["input_token_logprobs"][0][0] is None and meta["input_top_logprobs"][0] is None
    return {"json": state["json"], "completion_tokens": meta["completion_tokens"]}


def cot_decoding(sgl) -> dict:
    @sgl.function
    def cot(s, question, get_top_k):
        s += "Question: " + question + "\nAnswer:"
        step_0 = s.fork(1)[0]
        forks = s.fork(get_top_k)
        step_0 += sgl.gen("get_top_k", max_tokens=0, return_logprob=True, top_logprobs_num=get_top_k,
                          return_text_in_logprobs=True)
        logprobs = step_0.get_meta_info("get_top_k")["output_top_logprobs"][0]
        assert len(logprobs) == get_top_k
        for fork, (logprob, _, text) in zip(forks, logprobs):
            fork += text + sgl.gen("answer", temperature=0, max_tokens=6, return_logprob=True, top_logprobs_num=2,
                                   return_text_in_logprobs=True)
        s["first_tokens"] = [text for _, _, text in logprobs]
        s["probabilities"] = [math.exp(logprob) for logprob, _, _ in logprobs]
        s["paths"] = [raw_text(fork) for fork in forks]
        s["margins"] = [[row[0][0] - row[1][0] for row in fork.get_meta_info("answer")["output_top_logprobs"]]
                        for fork in forks]

    state = cot.run(question="How many eggs are in 3 dozen?", get_top_k=3)  # (top_k is a run() keyword)
    assert state["probabilities"] == sorted(state["probabilities"], reverse=True) and sum(state["probabilities"]) <= 1
    for path, first in zip(state["paths"], state["first_tokens"]):
        assert path.startswith("Question: How many eggs are in 3 dozen?\nAnswer:" + first)
    assert all(len(m) == 6 and min(m) >= 0 for m in state["margins"])
    return {"first_tokens": state["first_tokens"], "paths": state["paths"]}


class Weapon(str, Enum):
    sword = "sword"
    axe = "axe"
    bow = "bow"


class Wizard(BaseModel):
    name: Annotated[str, StringConstraints(max_length=8)]
    age: int = Field(ge=0, le=999)
    weapon: Weapon


def json_decode(sgl) -> dict:
    # SGLang's example imports it from sglang.srt.constrained.outlines_backend, which needs outlines==0.1
    # (not installable beside outlines-core 0.2): the regex is a string, so sglite's serves both clients.
    from sglite.srt.constrained.outlines_backend import build_regex_from_object

    regex = build_regex_from_object(Wizard)

    @sgl.function
    def wizard(s):
        s += "Give me a description about a wizard in the JSON format.\n"
        s += sgl.gen("character", max_tokens=128, temperature=0, regex=regex)

    state = wizard.run()
    assert re.fullmatch(regex, state["character"])
    Wizard.model_validate_json(state["character"])
    return {"character": state["character"]}


def multi_stage_fork(sgl) -> dict:
    @sgl.function
    def tips(s, topic):
        s += "Here are two tips for " + topic + ": 1. Balanced diet. 2. Regular exercise.\n\n"
        forks = s.fork(2)
        for i, fork in enumerate(forks):
            fork += f"Now, expand tip {i + 1} into a paragraph:\n"
            fork += sgl.gen("detailed_tip", max_tokens=8, temperature=0, stop="\n\n")
        forks.join()
        second = s.fork(2)
        for i, fork in enumerate(second):
            fork += f"A summary of tip {i + 1}:" + sgl.gen("summary", max_tokens=6, temperature=0)
        second.join()
        s += "Tip 1:" + forks[0]["detailed_tip"] + "\nTip 2:" + forks[1]["detailed_tip"] + "\n"
        s += "In summary" + sgl.gen("summary_all", max_tokens=6, temperature=0)

    state = tips.run(topic="staying healthy")
    assert len(state["detailed_tip"]) == 2 and len(state["summary"]) == 2  # gather_variable: one per fork
    assert raw_text(state).endswith("In summary" + state["summary_all"])
    return {"tips": state["detailed_tip"], "summaries": state["summary"], "text": raw_text(state)}


def parallel_sample(sgl) -> dict:
    @sgl.function
    def sample(s, question, num):
        s += "Question: " + question + "\nAnswer:"
        forks = s.fork(num)
        forks += sgl.gen("answer", max_tokens=6, temperature=0)
        forks.join()
        s += sgl.gen("greedy", max_tokens=6, temperature=0)

    state = sample.run(question="What is 1 + 2 + 3?", num=3)  # (n is a run() keyword)
    assert len(state["answer"]) == 3 and len(set(state["answer"])) == 1  # greedy forks agree
    assert state["greedy"] == state["answer"][0]
    return {"answers": state["answer"]}


def sgl_gen_min_tokens(sgl) -> dict:
    @sgl.function
    def bounded(s):
        s += "Say something short."
        s += sgl.gen("plain", max_tokens=16, temperature=0)
        s += "\nAgain:" + sgl.gen("at_least", min_tokens=12, max_tokens=16, temperature=0)

    state = bounded.run()
    assert state.get_meta_info("at_least")["completion_tokens"] >= 12
    return {"plain": state["plain"], "at_least": state["at_least"]}


def streaming(sgl) -> dict:
    @sgl.function
    def qa(s, question):
        s += sgl.system("You are a helpful assistant.")
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=12, temperature=0, ignore_eos=True))

    state = qa.run(question="List three colours.", stream=True)
    pieces = list(state.text_iter(var_name="answer"))
    assert "".join(pieces) == state["answer"]

    async def collect():
        streamed = qa.run(question="List three colours.", stream=True)
        return [chunk async for chunk in streamed.text_async_iter(var_name="answer")]

    assert "".join(asyncio.run(collect())) == state["answer"]
    return {"answer": state["answer"], "messages": state.messages()}


def readme_examples(sgl) -> dict:
    @sgl.function
    def multi_turn(s, question_1, question_2):
        s += sgl.system("You are a helpful assistant.")
        s += sgl.user(question_1)
        s += sgl.assistant(sgl.gen("answer_1", max_tokens=8, temperature=0))
        s += sgl.user(question_2)
        s += sgl.assistant(sgl.gen("answer_2", max_tokens=8, temperature=0))

    @sgl.function
    def regular_expression(s):
        s += "Q: What is the IP address of the Google DNS servers?\nA: "
        s += sgl.gen("answer", temperature=0, regex=r"((25[0-5]|2[0-4]\d|[01]?\d\d?).){3}(25[0-5]|2[0-4]\d|[01]?\d\d?)")

    chat = multi_turn.run(question_1="What is the capital of France?", question_2="And of Italy?")
    assert [m["role"] for m in chat.messages()] == ["system", "user", "assistant", "user", "assistant"]
    assert raw_text(chat).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    states = regular_expression.run_batch([{}, {}])
    assert all(re.fullmatch(r"((25[0-5]|2[0-4]\d|[01]?\d\d?).){3}(25[0-5]|2[0-4]\d|[01]?\d\d?)", st["answer"]) for st in states)
    return {"chat": raw_text(chat), "ip": [st["answer"] for st in states]}


PROGRAMS: dict[str, Callable[[Any], dict]] = {f.__name__: f for f in (
    choices_logprob, json_logprobs, cot_decoding, json_decode, multi_stage_fork, parallel_sample,
    sgl_gen_min_tokens, streaming, readme_examples,
)}


@pytest.fixture(scope="module")
def sglite_results(tiny_runtime) -> dict[str, dict]:
    """Each program's summary in process (computed once, compared below)."""
    results = {}
    with sglite_backend(tiny_runtime) as sgl:
        for name, program in PROGRAMS.items():
            try:
                results[name] = program(sgl)
            except Exception as exc:  # reported by the program's own test
                results[name] = exc
    return results


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_program_in_process(sglite_results, name):
    if isinstance(sglite_results[name], Exception):
        raise sglite_results[name]


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_program_through_sglangs_runtime_endpoint_matches(sglite_results, tiny_server, name):
    with sglang_backend(tiny_server) as sgl:
        remote = PROGRAMS[name](sgl)
    local = sglite_results[name]
    if isinstance(local, Exception):
        pytest.fail(f"the in-process run failed: {local!r}")
    assert_same(json.loads(json.dumps(remote)), json.loads(json.dumps(local)))


def assert_same(remote: Any, local: Any, path: str = "") -> None:
    """Equal structures; floats (logprobs from two engines with the same weights) to 1e-3."""
    if isinstance(local, float):
        assert remote == pytest.approx(local, abs=1e-3), path
    elif isinstance(local, list):
        assert isinstance(remote, list) and len(remote) == len(local), path
        for i, (r, v) in enumerate(zip(remote, local)):
            assert_same(r, v, f"{path}[{i}]")
    elif isinstance(local, dict):
        assert isinstance(remote, dict) and remote.keys() == local.keys(), path
        for key in local:
            assert_same(remote[key], local[key], f"{path}.{key}")
    else:
        assert remote == local, path
