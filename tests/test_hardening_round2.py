"""Hardening round 2 (issue 29): constraint compiles that crash are 400s, admission closes with the
signal, ``max_tokens`` past the context is one 400 everywhere, an abandoned request logs no traceback,
and ``/generate`` streams can be incremental (SGLang's ``--incremental-streaming-output``)."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import re
import signal
import socket

import httpx
import pytest

from sglite.runtime.input_processor import ContextLengthError
from sglite.runtime.server import ServerConfig
from sglite.runtime.server.testing import serve_in_thread

NESTED = "(" * 5000 + "a" + ")" * 5000  # RecursionError in Python's re parser
HUGE_REPEAT = "a{4294967296}"  # OverflowError in Python's re parser
DEEP_SCHEMA = '{"type":"array","items":' * 3000 + '{"type":"string"}' + "}" * 3000  # RecursionError in json.loads
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(engine):
    with serve_in_thread(engine, ServerConfig(log_level="critical")) as url:
        yield url


def five_hundreds(url: str) -> int:
    return sum(int(float(v)) for v in re.findall(r'status="5\d\d"\} (\S+)', httpx.get(f"{url}/metrics").text))


# ---- 1. every constraint compile failure is the client's 400 ----------------------------------------


@pytest.mark.parametrize(
    "params, field",
    [
        ({"regex": NESTED}, "regex"),
        ({"regex": HUGE_REPEAT}, "regex"),
        ({"json_schema": DEEP_SCHEMA}, "json_schema"),
        ({"json_schema": {"type": "string", "pattern": NESTED}}, "json_schema"),
        ({"stop_regex": HUGE_REPEAT}, "stop_regex"),
    ],
)
def test_engine_refuses_crashing_constraints_with_a_value_error(engine, params, field):
    with pytest.raises(ValueError, match=field):
        engine.generate("hi", {"max_new_tokens": 2, **params})
    engine.check_invariant()


def _tool(parameters: dict) -> list[dict]:
    return [{"type": "function", "function": {"name": "f", "parameters": parameters}}]


HOSTILE_CONSTRAINTS = [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "regex": NESTED}, "regex"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "regex": HUGE_REPEAT, "stream": True}, "regex"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "ebnf": "root ::= " + "(" * 5000 + '"a"' + ")" * 5000}, "ebnf"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, "regex": HUGE_REPEAT}, "regex"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, "regex": NESTED, "stream": True}, "regex"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": NESTED}}}}, "json_schema"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, "tool_choice": "required",
                              "tools": _tool({"type": "object", "properties": {"a": {"type": "string", "pattern": HUGE_REPEAT}}})},
     "json_schema"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 2, "regex": NESTED}}, "regex"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 2, "regex": HUGE_REPEAT}, "stream": True}, "regex"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 2, "json_schema": DEEP_SCHEMA}}, "json_schema"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 2, "stop_regex": HUGE_REPEAT}}, "stop_regex"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 2, "n": 2, "regex": HUGE_REPEAT}, "stream": True}, "regex"),
]


def test_crashing_constraints_are_400s_naming_the_field_on_every_route(server, engine):
    before = five_hundreds(server)
    for path, body, field in HOSTILE_CONSTRAINTS:
        response = httpx.post(f"{server}{path}", json=body, timeout=60)
        assert response.status_code == 400, (path, field, response.text[:300])
        error = response.json()["error"]
        assert error["param"] == field and field in error["message"], (path, error)
    assert five_hundreds(server) == before
    engine.wait_idle(30)
    engine.check_invariant()


# ---- 2. admission closes with the signal ------------------------------------------------------------


def test_no_route_admits_a_request_once_sigterm_is_handled(engine):
    from sglite.runtime.server.app import create_app
    from sglite.runtime.server.server import GracefulServer

    config = ServerConfig(log_level="critical")
    app = create_app(engine, config)
    server = GracefulServer(app, config)
    requests = [
        ("POST", "/v1/completions", {"prompt": "late", "max_tokens": 2}),
        ("POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2}),
        ("POST", "/generate", {"text": "late", "sampling_params": {"max_new_tokens": 2}}),
        ("GET", "/v1/models", None),
        ("GET", "/get_server_info", None),
        ("GET", "/health", None),
        ("GET", "/metrics", None),
        ("GET", "/no/such/route", None),
    ]

    async def send_all() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sglite") as client:
            assert (await client.get("/health")).status_code == 200
            # What the signal handler runs: the next request (no tick of uvicorn's loop in between) is refused.
            server.handle_exit(signal.SIGTERM, None)
            return [await client.request(method, path, json=body) for method, path, body in requests]

    responses = asyncio.run(send_all())
    assert [r.status_code for r in responses] == [503] * len(requests), [(r.request.url.path, r.text[:100]) for r in responses]
    assert all(r.json()["error"]["code"] == "shutting_down" for r in responses)
    assert server.should_exit  # uvicorn's own shutdown still follows
    assert engine.get_stats()["num_running"] == 0


# ---- 4. max_tokens past the context: one rule --------------------------------------------------------


def test_engine_refuses_max_new_tokens_past_the_context(engine):
    context = engine.context_length
    prompt = [10 + i % 1000 for i in range(context - 3)]
    with pytest.raises(ContextLengthError) as refused:
        engine.generate(prompt, {"max_new_tokens": 4})
    assert str(refused.value).startswith(
        f"This model's maximum context length is {context} tokens. However, you requested {context + 1} tokens "
        f"({context - 3} in the messages, 4 in the completion)"
    )
    fits = engine.generate(prompt, {"max_new_tokens": 3, "ignore_eos": True, "temperature": 0})
    assert fits["meta_info"]["completion_tokens"] == 3
    # Left unset, max_new_tokens is no promise: generation stops at the context, as a length finish.
    unset = engine.generate(prompt, {"ignore_eos": True, "temperature": 0})
    assert unset["meta_info"]["completion_tokens"] == 3 and unset["meta_info"]["finish_reason"]["type"] == "length"
    engine.check_invariant()


@pytest.mark.parametrize("value", [1e18, 1.5, 5.0, "5", True])
def test_a_non_integer_max_new_tokens_is_refused(engine, value):
    with pytest.raises(ValueError, match="'max_new_tokens' must be an integer"):
        engine.generate("hi", {"max_new_tokens": value})


def test_max_tokens_rule_is_the_same_on_every_route(server, engine):
    context = engine.context_length
    prompt = [10 + i % 1000 for i in range(context - 3)]
    over = [
        ("/v1/completions", {"prompt": prompt, "max_tokens": 4}),
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": context}),
        ("/generate", {"input_ids": prompt, "sampling_params": {"max_new_tokens": 4}}),
        ("/generate", {"input_ids": prompt, "sampling_params": {"max_new_tokens": 4}, "stream": True}),
    ]
    for path, body in over:
        response = httpx.post(f"{server}{path}", json=body, timeout=60)
        assert response.status_code == 400, (path, response.text[:300])
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded", error
        assert re.match(rf"This model's maximum context length is {context} tokens\. However, you requested \d+ tokens "
                        r"\(\d+ in the messages, \d+ in the completion\)", error["message"]), error
    non_integers = [
        ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 1e18}}, "max_new_tokens"),
        ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 1.5}}, "max_new_tokens"),
        ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": "5"}}, "max_new_tokens"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 1e18}, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 1.5}, "max_tokens"),
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": "5"}, "max_tokens"),
    ]
    for path, body, field in non_integers:
        response = httpx.post(f"{server}{path}", json=body, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["param"] == field, (path, body, response.text[:300])
    engine.wait_idle(30)
    engine.check_invariant()


# ---- 5. an abandoned request logs no traceback ------------------------------------------------------


def test_a_request_abandoned_by_its_client_logs_no_traceback(server, engine, caplog):
    host, port = server.removeprefix("http://").split(":")
    caplog.set_level(logging.INFO)
    for path, body in [
        ("/v1/completions", {"prompt": "left", "max_tokens": 1500, "ignore_eos": True}),
        ("/generate", {"text": "left", "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True}}),
    ]:
        before = engine.get_stats()["num_running"]
        raw = json.dumps(body).encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
            wait_for(lambda: engine.get_stats()["num_running"] > before)  # generating: the client leaves now
        assert engine.wait_idle(30)  # the disconnect aborted it
        wait_for(lambda: abandoned(server) >= 1)
    gc.collect()  # an unretrieved future's exception is logged when the future is collected
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not noisy, [r.getMessage()[:200] for r in noisy]
    assert abandoned(server) >= 2


def abandoned(url: str) -> int:
    return sum(int(float(v)) for v in re.findall(r'status="499"\} (\S+)', httpx.get(f"{url}/metrics").text))


def wait_for(condition, timeout: float = 30.0) -> None:
    """Poll a counter-based ``condition`` (no fixed sleeps) until it holds."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# ---- 6. incremental /generate streams ----------------------------------------------------------------


def native_stream(url: str, max_new_tokens: int) -> tuple[list[dict], int]:
    body = {"text": "count", "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True},
            "stream": True}
    events, size = [], 0
    with httpx.stream("POST", f"{url}/generate", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            size += len(line)
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    return events, size


def test_incremental_streaming_joins_to_the_whole_output_in_linear_bytes(engine, server):
    whole = httpx.post(f"{server}/generate", json={"text": "count", "sampling_params": {
        "max_new_tokens": 200, "temperature": 0, "ignore_eos": True}}, timeout=120).json()
    cumulative, cumulative_bytes = native_stream(server, 200)
    assert cumulative[-1]["text"] == whole["text"] and cumulative[-1]["output_ids"] == whole["output_ids"]
    with serve_in_thread(engine, ServerConfig(log_level="critical", incremental_streaming_output=True)) as url:
        events, incremental_bytes = native_stream(url, 200)
        small, small_bytes = native_stream(url, 50)
    assert "".join(e["text"] for e in events) == whole["text"]
    assert [t for e in events for t in e["output_ids"]] == whole["output_ids"]
    assert all(len(e["output_ids"]) <= 1 for e in events)  # one token per event: nothing resent
    assert events[-1]["meta_info"]["completion_tokens"] == 200
    assert 3.5 * small_bytes < incremental_bytes < 4.5 * small_bytes  # linear: 4x the tokens, ~4x the bytes
    assert incremental_bytes * 1.5 < cumulative_bytes  # cumulative events grow with the square


def test_sglang_runtime_endpoint_streams_the_default_cumulative_form(server):
    sglang = pytest.importorskip("sglang", reason="needs the compat extra (sglang==0.5.23)")

    @sglang.function
    def count(s):
        s += "count"
        s += sglang.gen("out", max_tokens=40, temperature=0, ignore_eos=True)

    endpoint = sglang.RuntimeEndpoint(server)
    whole = count.run(backend=endpoint)["out"]
    state = count.run(backend=endpoint, stream=True)
    pieces = list(state.text_iter("out"))
    assert len(pieces) > 1 and "".join(pieces) == whole
