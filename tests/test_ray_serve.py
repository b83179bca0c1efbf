"""``serve --replicas``: the HTTP API over engine replicas on a local Ray instance, through the real openai SDK."""

from __future__ import annotations

import re
import time

import httpx
import openai
import pytest

ray = pytest.importorskip("ray")

import sglite  # noqa: E402
from sglite.runtime.cluster.pool import LOCAL_SYSTEM_CONFIG, PoolConfig, ReplicaPool  # noqa: E402
from sglite.runtime.server.replicated_engine import ReplicatedEngine  # noqa: E402
from sglite.runtime.server import ServerConfig  # noqa: E402
from sglite.runtime.server.testing import serve_in_thread  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # a Ray that cannot start must not hang CI

KEY = "sk-replicas"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def replicated(llama_path):
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2, log_to_driver=False,
             _system_config=LOCAL_SYSTEM_CONFIG)
    pool = ReplicaPool(str(llama_path), PoolConfig(replicas=2, restart_failed=True), {"max_total_tokens": 8192})
    engine = ReplicatedEngine(pool)
    try:
        with serve_in_thread(engine, ServerConfig(api_key=KEY, log_level="warning")) as url:
            yield engine, url
    finally:
        engine.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def single(llama_path):
    with sglite.Engine(str(llama_path), max_total_tokens=8192) as engine:
        yield engine


@pytest.fixture(scope="module")
def client(replicated):
    return openai.OpenAI(base_url=f"{replicated[1]}/v1", api_key=KEY, max_retries=0, timeout=120)


def test_openai_round_trips_match_a_single_engine(replicated, single, client):
    engine, url = replicated
    ids = single.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    expected = single.generate(ids, {"max_new_tokens": 6, "temperature": 0})["text"]
    chat = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=6)
    assert chat.choices[0].message.content == expected and chat.usage.prompt_tokens == len(ids)

    streamed = client.completions.create(model="tiny", prompt="Once upon a time", temperature=0, max_tokens=8, stream=True)
    plain = single.generate("Once upon a time", {"max_new_tokens": 8, "temperature": 0})["text"]
    assert "".join(c.choices[0].text for c in streamed if c.choices) == plain

    native = httpx.post(f"{url}/generate", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                        json={"text": "Once upon a time", "sampling_params": {"max_new_tokens": 8, "temperature": 0}})
    assert native.status_code == 200 and native.json()["text"] == plain

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="regex"):
        client.completions.create(model="tiny", prompt="x", max_tokens=4, extra_body={"regex": "("})

    stats = engine.get_stats()
    assert stats["replicas_answering"] == 2
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    requests_total = float(re.search(r"^sglite_engine_requests_total(?:\{[^}]*\})? (\S+)$", metrics, re.M).group(1))
    assert requests_total >= 3 and requests_total == pytest.approx(stats["requests_total"], abs=2)


def test_a_repeated_prompt_finds_its_prefix_on_the_replica_it_went_to(client):
    long_prompt = "Background: " + " ".join(f"item {i} costs {i * 3} coins." for i in range(60))
    first = client.completions.create(model="tiny", prompt=long_prompt, temperature=0, max_tokens=2)
    for _ in range(3):  # round-robin would send every other one to the replica without it
        again = client.completions.create(model="tiny", prompt=long_prompt, temperature=0, max_tokens=2)
        assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 2


def test_killed_replica_ends_its_requests_cleanly_and_is_replaced(replicated, client):
    engine, url = replicated
    stream = client.completions.create(model="tiny", prompt="A very long story:", max_tokens=1800, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))  # the request is running on its replica
    (replica,) = set(engine._where.values())
    ray.kill(engine.pool.actors[replica], no_restart=False)  # Ray restarts it
    started = time.monotonic()
    with pytest.raises(openai.APIError, match="replica"):
        for _ in stream:
            pass
    assert time.monotonic() - started < 60  # an error, not a client timeout

    # The service goes on: both replicas answer again (the killed one after its restart).
    for i in range(4):
        out = client.completions.create(model="tiny", prompt=f"Question {i}", temperature=0, max_tokens=3)
        assert out.usage.completion_tokens == 3
    deadline = time.monotonic() + 120
    while engine.get_stats()["replicas_answering"] < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert engine.get_stats()["replicas_answering"] == 2
    assert not engine._where  # nothing left registered in flight
