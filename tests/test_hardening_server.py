"""No request can hurt another over HTTP (loopback): hostile requests next to victim streams, linear
streams, rate limiting, generic 500s on a live connection, shutdown and slow clients (issue 9)."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import socket
import threading
import time

import httpx
import pytest

import sglite
from sglite.runtime.server import ServerConfig
from sglite.runtime.server.testing import serve_in_thread

VICTIM_TOKENS = 24


@pytest.fixture(scope="module")
def engine(llama_path):
    with sglite.Engine(str(llama_path), max_total_tokens=16384, max_running_requests=64) as engine:
        yield engine


@pytest.fixture(scope="module")
def server(engine):
    with serve_in_thread(engine, ServerConfig(log_level="critical")) as url:
        yield url


def wait_idle(engine, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.get_stats()["num_running"] + engine.get_stats()["num_waiting"]:
        assert time.monotonic() < deadline, engine.get_stats()
        time.sleep(0.02)


def five_hundreds(url: str) -> int:
    return sum(int(float(v)) for v in re.findall(r'status="5\d\d"\} (\S+)', httpx.get(f"{url}/metrics").text))


async def victim_stream(client: httpx.AsyncClient, url: str, i: int) -> str:
    body = {"prompt": f"victim {i}", "max_tokens": VICTIM_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True}
    text = []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                text.append(event["choices"][0]["text"])
                if event["choices"][0]["finish_reason"] is not None:
                    assert event["choices"][0]["finish_reason"] == "length"
    return "".join(text)


HOSTILE = [
    ("/v1/completions", {"prompt": "a", "max_tokens": 24, "temperature": 1e-38}),
    ("/v1/completions", {"prompt": "b", "max_tokens": 24, "temperature": 1.0, "repetition_penalty": 1e-40}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "c"}], "max_tokens": 24, "temperature": 5e-38, "top_p": 1e-30}),
    ("/generate", {"text": "d", "sampling_params": {"max_new_tokens": 24, "temperature": 1e-38, "repetition_penalty": 1e-40}}),
    ("/generate", {"text": "e", "sampling_params": {"max_new_tokens": 8, "min_new_tokens": 4, "stop_token_ids": list(range(2048))}}),
    ("/generate", {"text": "f", "sampling_params": {"max_new_tokens": 8, "stop_token_ids": [10**6]}}),
    ("/generate", {"text": 123}),
    ("/v1/completions", {"prompt": "x" * 200_000, "max_tokens": 1}),
]


def test_eight_victim_streams_survive_the_hostile_mix(server, engine):
    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            alone = [await victim_stream(client, server, i) for i in range(8)]
            before = five_hundreds(server)
            victims = [victim_stream(client, server, i) for i in range(8)]
            attacks = [client.post(f"{server}{path}", json=body) for path, body in HOSTILE]
            results = await asyncio.gather(*victims, *attacks)
            return alone, results[:8], results[8:], before

    alone, together, responses, before = asyncio.run(main())
    assert together == alone  # greedy victims produced exactly what they produce alone
    statuses = [r.status_code for r in responses]
    assert statuses[:4] == [200] * 4, [r.text[:200] for r in responses[:4]]
    assert statuses[4:] == [400] * 4, [r.text[:200] for r in responses[4:]]
    assert "vocabulary" in responses[4].json()["error"]["message"] and "vocabulary" in responses[5].json()["error"]["message"]
    assert five_hundreds(server) == before
    wait_idle(engine)
    engine.check_invariant()


def stream_bytes(url: str, tokens: int) -> int:
    body = {"prompt": "linear", "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True, "logprobs": 5}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        return sum(len(chunk) for chunk in response.iter_bytes())


def test_streamed_bytes_grow_linearly(server):
    small, large = stream_bytes(server, 50), stream_bytes(server, 200)
    assert 3.5 * small < large < 4.5 * small, (small, large)


def test_health_answers_while_a_heavy_logprob_stream_runs(server, engine):
    body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 1500, "ignore_eos": True, "stream": True,
            "logprobs": True, "top_logprobs": 20}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=120) as response:
        lines = response.iter_lines()
        for _ in range(10):
            next(lines)
        with httpx.Client(timeout=30) as client:
            assert all(client.get(f"{server}/health").status_code == 200 for _ in range(20))
        # Twenty health checks answered while the stream is still generating: none waited for it to end.
        assert engine.get_stats()["num_running"] == 1
    wait_idle(engine)


@pytest.mark.slow
def test_rate_limit_is_per_address_and_counts_bad_keys(engine):
    with serve_in_thread(engine, ServerConfig(rate_limit=5, log_level="critical")) as url:
        statuses = [httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer made-up-{i}"}).status_code for i in range(30)]
        assert statuses.count(200) == 5 and statuses.count(429) == 25
    with serve_in_thread(engine, ServerConfig(rate_limit=5, api_key="sk-right", log_level="critical")) as url:
        statuses = [httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer guess-{i}"}).status_code for i in range(30)]
        assert statuses.count(401) == 5 and statuses.count(429) == 25


class FailingStats:
    """An engine whose ``get_stats`` raises with internal detail (a server bug behind /get_server_info)."""

    def __init__(self, engine) -> None:
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def get_stats(self):
        raise RuntimeError("secret internal detail at 0xdeadbeef")


def test_a_500_keeps_the_connection_and_hides_the_detail(engine):
    with serve_in_thread(FailingStats(engine), ServerConfig(log_level="critical")) as url:
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/get_server_info")
        response = conn.getresponse()
        body = json.loads(response.read())
        assert response.status == 500 and not response.will_close
        assert "secret" not in body["error"]["message"] and "id" in body["error"]["message"]
        sock = conn.sock
        conn.request("GET", "/health")
        again = conn.getresponse()
        assert again.status == 200 and json.loads(again.read())["status"] == "ok"
        assert conn.sock is sock  # the same keep-alive connection answered
        conn.close()


def test_engine_failure_text_is_not_sent_to_clients(server, engine, monkeypatch):
    forward = engine.scheduler.forward
    poison = engine.runner.model.vocab_size - 1

    def flaky_forward(batch, rows):
        if poison in batch.input_ids.tolist():
            raise RuntimeError("secret kernel detail")
        return forward(batch, rows)

    monkeypatch.setattr(engine.scheduler, "forward", flaky_forward)
    response = httpx.post(f"{server}/v1/completions", json={"prompt": [poison], "max_tokens": 2}, timeout=60)
    body = {"prompt": [poison], "max_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as streamed:
        events = [line[6:] for line in streamed.iter_lines() if line.startswith("data: ")]
    native = {"input_ids": [poison], "sampling_params": {"max_new_tokens": 2}, "stream": True}
    with httpx.stream("POST", f"{server}/generate", json=native, timeout=60) as streamed:
        native_events = [line[6:] for line in streamed.iter_lines() if line.startswith("data: ")]
    monkeypatch.setattr(engine.scheduler, "forward", forward)
    assert native_events[-1] == "[DONE]" and "secret" not in native_events[-2]
    assert json.loads(native_events[-2])["error"]["code"] == "generation_failed"
    assert response.status_code == 500
    message = response.json()["error"]["message"]
    assert "secret" not in message and "request" in message
    # Streamed, the failure is an in-band error event (generic too), then [DONE].
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "generation_failed" and "secret" not in error["message"]
    assert httpx.get(f"{server}/health").status_code == 200


def test_slow_headers_and_short_bodies_are_cut_off(engine):
    config = ServerConfig(header_timeout=0.5, body_timeout=0.5, log_level="critical")
    with serve_in_thread(engine, config) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            assert sock.recv(100) == b""  # closed by the server, not by our 10 s timeout
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"pro")
            assert sock.recv(100).startswith(b"HTTP/1.1 408")
        assert httpx.get(f"{url}/health").status_code == 200


def test_connection_cap_refuses_the_excess_at_once(engine):
    config = ServerConfig(header_timeout=60.0, max_connections=4, log_level="critical")
    with serve_in_thread(engine, config) as url:
        host, port = url.removeprefix("http://").split(":")
        socks = [socket.create_connection((host, int(port)), timeout=10) for _ in range(10)]
        try:
            for sock in socks:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finished
            assert all(closed_by_server(sock) for sock in socks[4:])  # refused long before the 60 s deadline
            for sock in socks[:4]:
                sock.settimeout(0.5)
                with pytest.raises(socket.timeout):
                    sock.recv(100)  # within the cap: still open, waiting for the rest of its head
        finally:
            for sock in socks:
                sock.close()
        assert httpx.get(f"{url}/health").status_code == 200


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:  # closed with our unread request in its buffer
        return True


class SlowTokenizer:
    """A tokenizer proxy whose ``encode`` waits until released (a prompt still tokenizing at SIGTERM)."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self.entered = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def encode(self, *args, **kwargs):
        self.entered.set()
        self.release.wait(30)
        return self._tokenizer.encode(*args, **kwargs)


class SlowEngine:
    def __init__(self, engine) -> None:
        self._engine = engine
        self.tokenizer = SlowTokenizer(engine.tokenizer)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def test_shutdown_answers_503_consistently_even_while_tokenizing(engine):
    from sglite.runtime.server.app import create_app
    from sglite.runtime.server.server import GracefulServer

    slow = SlowEngine(engine)
    config = ServerConfig(host="127.0.0.1", port=0, log_level="critical")
    app = create_app(slow, config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = GracefulServer(app, config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{port}"
    try:
        result: list[httpx.Response] = []
        pending = threading.Thread(
            target=lambda: result.append(httpx.post(f"{url}/v1/completions", json={"prompt": "tok", "max_tokens": 2}, timeout=60))
        )
        pending.start()
        assert slow.tokenizer.entered.wait(30)
        # Shutdown starts (what GracefulServer.shutdown does first on SIGTERM) while that prompt is tokenizing.
        asyncio.run_coroutine_threadsafe(app.state.drain(0.0), server_loop(server)).result(30)
        assert httpx.get(f"{url}/health").status_code == 503
        new = httpx.post(f"{url}/v1/completions", json={"prompt": "new", "max_tokens": 2}, timeout=60)
        assert new.status_code == 503 and new.json()["error"]["code"] == "shutting_down"
        slow.tokenizer.release.set()
        pending.join(30)
        assert result[0].status_code == 503, result[0].text
    finally:
        slow.tokenizer.release.set()
        server.should_exit = True
        thread.join(30)
        sock.close()
    wait_idle(engine)


def server_loop(server) -> asyncio.AbstractEventLoop:
    """The event loop uvicorn runs ``server`` on (its servers hold a reference)."""
    return server.servers[0].get_loop()
