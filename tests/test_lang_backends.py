"""The remote backends against a real sglite server on loopback: ``RuntimeEndpoint`` (native
``/generate``) and ``OpenAI`` (the ``openai`` SDK on ``/v1``) run the same programs as ``Runtime``."""

from __future__ import annotations

import json

import pytest

import sglite as sgl
from sglite.runtime.server.config import ServerConfig
from sglite.runtime.server.testing import serve_in_thread

API_KEY = "sk-lang-test"


@pytest.fixture(scope="module")
def server_url(runtime):
    with serve_in_thread(runtime.engine, ServerConfig(api_key=API_KEY, log_level="warning")) as url:
        yield url


@pytest.fixture(scope="module")
def endpoint(server_url):
    backend = sgl.RuntimeEndpoint(server_url, api_key=API_KEY)
    yield backend
    backend.shutdown()


@pytest.fixture(scope="module")
def openai_chat(server_url, llama_path):
    return sgl.OpenAI(llama_path.name, base_url=f"{server_url}/v1", api_key=API_KEY)


@sgl.function
def qa(s, question):
    s += "Question: " + question + "\nAnswer:" + sgl.gen("answer", max_tokens=6, temperature=0, ignore_eos=True)
    s += "\nSure? " + sgl.select("sure", choices=["yes", "no", "not at all"])


def test_endpoint_runs_programs_like_runtime(runtime, endpoint):
    local = qa.run(question="2+2?", backend=runtime)
    remote = qa.run(question="2+2?", backend=endpoint)
    assert remote["answer"] == local["answer"] and remote["sure"] == local["sure"]
    assert remote.get_meta_info("sure")["normalized_prompt_logprobs"] == pytest.approx(
        local.get_meta_info("sure")["normalized_prompt_logprobs"], abs=1e-4
    )
    assert remote.get_meta_info("answer")["cached_tokens"] > 0  # the local run cached this prompt


def test_endpoint_streams_and_constrains(endpoint):
    @sgl.function
    def numbered(s):
        s += "Count: " + sgl.gen("n", dtype=int, max_tokens=6) + " then " + sgl.gen("w", max_tokens=5, ignore_eos=True)

    state = numbered.run(backend=endpoint, stream=True)
    pieces = list(state.text_iter("w"))
    assert len(pieces) > 1 and "".join(pieces) == state["w"]
    int(state["n"])


def test_endpoint_reports_bad_requests_as_value_errors(server_url, endpoint):
    @sgl.function
    def bad(s):
        s += "x" + sgl.gen("v", regex="(unclosed", max_tokens=3)

    with pytest.raises(ValueError, match="rejected"):
        bad.run(backend=endpoint)
    with pytest.raises(ValueError, match="401"):  # like SGLang's client, the constructor asks /get_model_info
        sgl.RuntimeEndpoint(server_url, chat_template="chatml")


@sgl.function
def chat(s, question):
    s += sgl.system("Answer briefly.")
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=5, ignore_eos=True))


def test_openai_chat_program(openai_chat):
    state = chat.run(question="Hi?", backend=openai_chat, temperature=0)
    assert state["answer"]
    assert [m["role"] for m in state.messages()] == ["system", "user", "assistant"]
    meta = state.get_meta_info("answer")
    assert meta["completion_tokens"] == 5 and meta["prompt_tokens"] > 0


def test_openai_matches_runtime_chat(runtime, openai_chat):
    # The server applies the same chat template, so greedy output is identical.
    local = chat.run(question="Same?", backend=runtime, temperature=0)
    remote = chat.run(question="Same?", backend=openai_chat, temperature=0)
    assert remote["answer"] == local["answer"]


def test_openai_streaming_select_and_json(openai_chat):
    state = chat.run(question="Stream?", backend=openai_chat, stream=True)
    pieces = list(state.text_iter("answer"))
    assert "".join(pieces) == state["answer"]

    @sgl.function
    def structured(s):
        s += sgl.user("Pick one.")
        s += sgl.assistant(sgl.select("pick", choices=["alpha", "beta"]))
        s += sgl.user("Now JSON.")
        schema = {"type": "object", "properties": {"k": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["k"]}
        s += sgl.assistant(sgl.gen("obj", json_schema=schema, max_tokens=32))

    state = structured.run(backend=openai_chat)
    assert state["pick"] in ("alpha", "beta")
    assert 0 <= json.loads(state["obj"])["k"] <= 99


def test_openai_chat_gen_outside_assistant_turn_is_refused(openai_chat):
    @sgl.function
    def raw(s):
        s += "plain text " + sgl.gen("x", max_tokens=2)

    with pytest.raises(sgl.LangError, match="sgl.assistant"):
        raw.run(backend=openai_chat)


def test_openai_completion_model(server_url, llama_path):
    backend = sgl.OpenAI(llama_path.name, base_url=f"{server_url}/v1", api_key=API_KEY, is_chat_model=False)
    state = qa.run(question="Complete?", backend=backend)
    assert state["answer"] and state["sure"] in ("yes", "no", "not at all")


def test_endpoint_returns_token_text_in_logprobs_like_runtime(runtime, endpoint):
    """SGLang's ``return_text_in_logprobs`` through POST /generate (and so ``RuntimeEndpoint``)."""

    @sgl.function
    def scored(s):
        s += "Hello" + sgl.gen("x", max_tokens=3, temperature=0, ignore_eos=True, top_logprobs_num=2,
                               return_text_in_logprobs=True)

    local = scored.run(backend=runtime).get_meta_info("x")
    remote = scored.run(backend=endpoint).get_meta_info("x")
    texts = [text for _, _, text in remote["output_token_logprobs"]]
    assert texts == [text for _, _, text in local["output_token_logprobs"]] and all(texts)
    assert all(text is not None for row in remote["output_top_logprobs"] for _, _, text in row)
