"""Nothing a client sends, or how it leaves, hurts the server: hostile payloads, load, disconnects, shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

import sglite
from sglite.runtime.server import ServerConfig
from sglite.runtime.server.testing import serve_in_thread

MAX_BODY = 256 * 1024
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def engine(llama_path):
    with sglite.Engine(str(llama_path), max_total_tokens=16384, max_running_requests=64) as engine:
        yield engine


@pytest.fixture(scope="module")
def server(engine):
    with serve_in_thread(engine, ServerConfig(max_body_bytes=MAX_BODY, log_level="warning")) as url:
        yield url


def wait_idle(engine, timeout: float = 60.0) -> dict:
    """Engine stats once no request is in flight (the engine's idle signal; ``timeout`` only bounds a hang)."""
    assert engine.wait_idle(timeout), f"requests still in flight after {timeout} s: {engine.get_stats()}"
    return engine.get_stats()


def assert_slots_accounted(engine) -> None:
    stats = wait_idle(engine)
    assert stats["pool_free"] + stats["cached_tokens_in_tree"] == stats["pool_size"], stats
    engine.check_invariant()


def chat(**fields):
    return ("/v1/chat/completions", {"messages": MSG, "max_tokens": 2, **fields})


def completion(**fields):
    return ("/v1/completions", {"prompt": "hi", "max_tokens": 2, **fields})


def raw(path, data: bytes, content_type="application/json"):
    return (path, data, content_type)


SCHEMA = {"type": "object", "properties": {"a": {"type": "string"}}}
DEEP = "[" * 5000 + "]" * 5000

# (path, JSON body) or (path, raw bytes, content type) -> must be answered 4xx with an error message.
HOSTILE = [
    # message structure
    ("/v1/chat/completions", {}),
    ("/v1/chat/completions", {"messages": "hi"}),
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}),  # a tool turn needs tool_call_id
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": {"a": [1, [2, [3]]]}}]}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "surprise": True}]}),
    ("/v1/chat/completions", {"messages": [["user", "hi"]]}),
    ("/v1/chat/completions", {"messages": [None]}),
    ("/v1/chat/completions", {"messages": {"role": "user", "content": "hi"}}),
    # sampling fields: wrong types, out of range, huge
    chat(temperature="hot"),
    chat(temperature=-1),
    chat(temperature=3),
    chat(max_tokens=-5),
    chat(max_tokens=1e30),
    chat(max_tokens=10**30),
    chat(max_tokens=2**31 - 1),
    chat(max_tokens="5"),
    chat(max_tokens=True),
    chat(max_tokens=2.5),
    chat(max_completion_tokens=-1),
    chat(n=0),
    chat(n=1000),
    chat(n="2"),
    chat(n=100),
    chat(top_p=1.5),
    chat(top_p=-0.1),
    chat(top_k=-5),
    chat(top_k=2**40),
    chat(min_p=2),
    chat(repetition_penalty=0),
    chat(repetition_penalty=-1),
    chat(frequency_penalty=5),
    chat(presence_penalty=-3),
    chat(stop=5),
    chat(stop=[""]),
    chat(stop=["a"] * 100),
    chat(stop=[1, 2]),
    chat(seed="abc"),
    chat(seed=2**70),
    chat(min_tokens=-1),
    chat(min_tokens=5),
    chat(stop_token_ids=[-1]),
    chat(ignore_eos="yes"),
    chat(logprobs="yes"),
    chat(logprobs=True, top_logprobs=50),
    chat(top_logprobs=5),
    chat(stream="true"),
    chat(stream_options={"include_usage": "yes"}),
    chat(stream_options={"foo": 1}),
    chat(stream_options=[]),
    # response_format and constraints
    chat(response_format={"type": "xml"}),
    chat(response_format={"type": "json_schema"}),
    chat(response_format={"type": "json_schema", "json_schema": {"schema": SCHEMA}}),
    chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": "not a schema"}}),
    chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}),
    chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}}),
    chat(response_format="json"),
    chat(regex="(unclosed"),
    chat(regex="["),
    chat(regex=5),
    chat(regex="a", response_format={"type": "json_object"}),
    # fields this server does not know or cannot honour
    chat(foo=1),
    chat(tools=[{"type": "function", "function": {"name": "not a name!"}}]),
    chat(functions=[{"name": "f"}]),
    chat(logit_bias={"1": 5}),
    chat(audio={"voice": "x"}),
    chat(tool_choice="required"),
    chat(modalities=["audio"]),
    # prompts over the context
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 40000}], "max_tokens": 1}),
    ("/v1/completions", {"prompt": list(range(3000)), "max_tokens": 1}),
    # completions
    ("/v1/completions", {"max_tokens": 2}),
    completion(prompt=""),
    completion(prompt=[]),
    completion(prompt=[[]]),
    completion(prompt=[-1]),
    completion(prompt=[10**10]),
    completion(prompt=[99999]),
    completion(prompt=[1.5]),
    completion(prompt=[["a"]]),
    completion(prompt={"a": 1}),
    completion(prompt=["x"] * 100),
    completion(echo="yes"),
    completion(logprobs=50),
    completion(logprobs=True),
    completion(suffix="x"),
    completion(best_of=3),
    # native /generate
    ("/generate", {}),
    ("/generate", {"text": "x", "input_ids": [1]}),
    ("/generate", {"text": "x", "sampling_params": {"bogus": 1}}),
    ("/generate", {"text": "x", "sampling_params": "x"}),
    ("/generate", {"text": []}),
    ("/generate", {"input_ids": [[]]}),
    ("/generate", {"text": ["a", "b"], "rid": ["only-one"]}),
    ("/generate", {"text": "x", "logprob_start_len": -5}),
    ("/generate", {"text": "x", "top_logprobs_num": 1000}),
    # broken bodies and wrong media types
    raw("/v1/chat/completions", b'{"messages": ['),
    raw("/v1/chat/completions", b"{"),
    raw("/v1/chat/completions", b"null"),
    raw("/v1/chat/completions", b"[]"),
    raw("/v1/chat/completions", b'"a string"'),
    raw("/v1/chat/completions", b"123"),
    raw("/v1/chat/completions", b""),
    raw("/v1/chat/completions", b"   "),
    raw("/v1/chat/completions", b'{"messages": [], }'),
    raw("/v1/chat/completions", b"{'single': 'quotes'}"),
    raw("/v1/chat/completions", b"\xff\xfe\x00garbage"),
    raw("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}'),
    raw("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
    raw("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}'),
    raw("/v1/completions", DEEP.encode()),
    raw("/v1/chat/completions", json.dumps({"messages": MSG}).encode(), "text/plain"),
    raw("/v1/chat/completions", b"messages=hi", "application/x-www-form-urlencoded"),
    raw("/v1/chat/completions", b"--b\r\n\r\n--b--", "multipart/form-data; boundary=b"),
    raw("/v1/completions", json.dumps({"prompt": "x" * (MAX_BODY + 10)}).encode()),
]


def send(url: str, case: tuple) -> httpx.Response:
    if len(case) == 2:
        return httpx.post(url + case[0], json=case[1], timeout=60)
    path, data, content_type = case
    return httpx.post(url + path, content=data, headers={"content-type": content_type}, timeout=60)


def test_there_are_a_hundred_hostile_payloads():
    assert len(HOSTILE) >= 100


@pytest.mark.parametrize("case", HOSTILE, ids=[f"{i:03d}" for i in range(len(HOSTILE))])
@pytest.mark.slow
def test_hostile_payload_gets_a_4xx_with_a_message(server, case):
    response = send(server, case)
    assert 400 <= response.status_code < 500 and response.status_code != 422, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_specific_statuses_and_params(server):
    assert send(server, chat(foo=1)).json()["error"]["param"] == "foo"
    assert send(server, chat(temperature="hot")).json()["error"]["param"] == "temperature"
    assert send(server, HOSTILE[-1]).status_code == 413
    assert send(server, raw("/v1/chat/completions", b"{}", "text/plain")).status_code == 415
    assert httpx.get(f"{server}/v1/chat/completions").status_code == 405
    assert httpx.post(f"{server}/v1/nowhere", json={}).status_code == 404
    big = b'{"prompt": "' + b"x" * (MAX_BODY + 10) + b'"}'

    def chunked():  # no Content-Length: the limit must hold while reading
        for i in range(0, len(big), 4096):
            yield big[i : i + 4096]

    assert httpx.post(f"{server}/v1/completions", content=chunked(), headers={"content-type": "application/json"}).status_code == 413


def test_server_still_answers_after_hostile_input(server, engine):
    for case in HOSTILE[:20]:
        send(server, case)
    ok = httpx.post(f"{server}/v1/chat/completions", json={"messages": MSG, "max_tokens": 3}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    metrics = httpx.get(f"{server}/metrics").text
    assert not re.search(r'status="5\d\d"', metrics), "a client payload caused a server error"
    assert_slots_accounted(engine)


def test_garbage_at_the_socket_level(server):
    host, port = server.removeprefix("http://").split(":")
    for junk in (b"NOT HTTP AT ALL\r\n\r\n", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(junk)
            assert sock.recv(100).startswith(b"HTTP/1.1 4")
    # A body that promises more than it sends, then hangs up.
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"pro")
    assert httpx.get(f"{server}/health").status_code == 200


@pytest.mark.slow
def test_64_concurrent_streams_all_complete_and_free_their_slots(server, engine):
    async def one(client: httpx.AsyncClient, i: int) -> tuple[str, int]:
        body = {
            "messages": [{"role": "system", "content": "Shared system prompt for every client."}, {"role": "user", "content": f"client {i}"}],
            "max_tokens": 8,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        events = []
        async with client.stream("POST", f"{server}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line:
                    events.append(line.removeprefix("data: "))
        assert events[-1] == "[DONE]"
        usage = json.loads(events[-2])["usage"]
        return "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-2] if json.loads(e)["choices"]), usage["completion_tokens"]

    async def main():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(64))), timeout=120)

    results = asyncio.run(main())
    assert len(results) == 64 and all(tokens == 8 for _, tokens in results)
    assert_slots_accounted(engine)


LONG = {"messages": MSG, "max_tokens": 1500, "stream": True, "ignore_eos": True}


@pytest.mark.slow
@pytest.mark.parametrize(
    "path, body, running",
    [
        ("/v1/chat/completions", LONG, 1),
        ("/v1/chat/completions", {**LONG, "n": 2}, 2),
        ("/v1/completions", {"prompt": ["a", "b"], "max_tokens": 1500, "stream": True, "ignore_eos": True}, 2),
        ("/generate", {"text": ["a", "b"], "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True}, "stream": True}, 2),
    ],
    ids=["chat", "chat-n2", "completions-batch", "generate-batch"],
)
def test_disconnect_mid_stream_aborts_the_request(server, engine, path, body, running):
    before = wait_idle(engine)["generation_tokens_total"]
    with httpx.stream("POST", f"{server}{path}", json=body, timeout=60) as response:
        lines = response.iter_lines()
        seen = 0
        while seen < 3 + running:
            seen += bool(next(lines))
        assert engine.get_stats()["num_running"] == running
    # Leaving the block closed the connection: every request is aborted long before its 1500 tokens.
    generated = wait_idle(engine)["generation_tokens_total"] - before
    assert generated < 1500 * running
    assert_slots_accounted(engine)


@pytest.mark.slow
def test_disconnect_while_waiting_for_a_whole_response_aborts_it(server, engine):
    before = wait_idle(engine)["generation_tokens_total"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", json={"prompt": "x", "max_tokens": 1500, "ignore_eos": True}, timeout=1.0)
    generated = wait_idle(engine)["generation_tokens_total"] - before
    assert 0 < generated < 1500  # it ran, and was cut short by the abort rather than finishing
    assert_slots_accounted(engine)


@pytest.mark.slow
def test_shutdown_ends_an_open_stream_with_an_error_event(engine):
    config = ServerConfig(graceful_shutdown_timeout=0.5, log_level="critical")
    with httpx.Client(timeout=60) as client:
        with serve_in_thread(engine, config) as url:
            response = client.send(client.build_request("POST", f"{url}/v1/chat/completions", json=LONG), stream=True)
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            # Leaving serve_in_thread shuts the server down while this stream is still open.
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2].removeprefix("data: "))["error"]["code"] == "aborted"
    assert_slots_accounted(engine)


@pytest.mark.slow
def test_cli_serves_and_exits_cleanly_on_sigint(llama_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sglite", "serve", "--model", str(llama_path), "--port", str(port),
         "--max-total-tokens", "4096", "--api-key", "sk-cli", "--rate-limit", "100/min", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        headers = {"Authorization": "Bearer sk-cli"}
        ok = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=headers, timeout=30)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "x"}).status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, proc.stdout.read().decode()
