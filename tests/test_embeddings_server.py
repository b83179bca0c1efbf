"""/v1/embeddings and /encode over HTTP: the openai SDK, LangChain's OpenAIEmbeddings and sgl.RuntimeEndpoint
against ``python -m sglite serve --model GEN --embedding-model EMB``; bad input is a 400 naming the field, and
changes nothing else."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

import sglite
from sglite.runtime.server.testing import serve_in_thread, serve_subprocess

SENTENCES = ["Paris is the capital of France.", "A cat sleeps on the sofa.", "Embeddings map text to vectors."]


@pytest.fixture(scope="module")
def minilm_path() -> str:
    from sglite.runtime.loading.default_model import default_embedding_model_path

    return str(default_embedding_model_path())


@pytest.fixture(scope="module")
def reference(minilm_path) -> np.ndarray:
    """The in-process vectors of SENTENCES (themselves checked against transformers in test_embeddings.py)."""
    engine = sglite.Engine(minilm_path)
    return np.array([o["embedding"] for o in engine.encode(SENTENCES)])


@pytest.fixture(scope="module")
def both_url(llama_path, minilm_path) -> Iterator[str]:
    """``sglite serve`` in a subprocess holding a generation model and an embedding model."""
    with serve_subprocess(["--model", str(llama_path), "--embedding-model", minilm_path, "--max-total-tokens", "1024"]) as url:
        yield url


@pytest.mark.slow
def test_openai_sdk_embeddings_float_and_base64(both_url, reference):
    import openai

    client = openai.OpenAI(base_url=f"{both_url}/v1", api_key="none")
    response = client.embeddings.create(input=SENTENCES, model="any")  # the SDK asks for base64 and decodes it
    vectors = np.array([d.embedding for d in response.data])
    assert [d.index for d in response.data] == [0, 1, 2]
    np.testing.assert_allclose(vectors, reference, atol=1e-6)
    assert response.usage.prompt_tokens == response.usage.total_tokens > len(SENTENCES)
    as_floats = client.embeddings.create(input=SENTENCES[0], model="any", encoding_format="float")
    np.testing.assert_allclose(as_floats.data[0].embedding, reference[0], atol=1e-6)
    raw = httpx.post(f"{both_url}/v1/embeddings", json={"input": SENTENCES[:1], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, reference[0], atol=1e-6)


@pytest.mark.slow
def test_token_id_inputs(both_url, reference, minilm_path):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(minilm_path)(SENTENCES)["input_ids"]
    one = httpx.post(f"{both_url}/v1/embeddings", json={"input": ids[0]}).json()
    many = httpx.post(f"{both_url}/v1/embeddings", json={"input": ids}).json()
    np.testing.assert_allclose(one["data"][0]["embedding"], reference[0], atol=1e-6)
    np.testing.assert_allclose([d["embedding"] for d in many["data"]], reference, atol=1e-6)
    assert one["usage"]["prompt_tokens"] == len(ids[0])


@pytest.mark.slow
def test_langchain_openai_embeddings(both_url, reference):
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(
        base_url=f"{both_url}/v1", api_key="none", model="all-MiniLM-L6-v2", check_embedding_ctx_length=False
    )
    np.testing.assert_allclose(embeddings.embed_documents(SENTENCES), reference, atol=1e-6)
    np.testing.assert_allclose(embeddings.embed_query(SENTENCES[1]), reference[1], atol=1e-6)


@pytest.mark.slow
def test_runtime_endpoint_encode_and_native_route(both_url, reference):
    backend = sglite.RuntimeEndpoint(both_url)
    out = backend.encode(SENTENCES)
    np.testing.assert_allclose([o["embedding"] for o in out], reference, atol=1e-6)
    assert backend.encode(SENTENCES[2])["meta_info"]["prompt_tokens"] > 0
    bad = httpx.post(f"{both_url}/encode", json={"text": "a", "input_ids": [1]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "text"


@pytest.mark.slow
def test_bad_embedding_input_is_a_400_and_changes_nothing(both_url):
    def error(body: dict) -> dict:
        response = httpx.post(f"{both_url}/v1/embeddings", json=body)
        assert response.status_code == 400, response.text
        return response.json()["error"]

    assert "input[1] is empty" in error({"input": ["ok", ""]})["message"]
    too_long = error({"input": "word " * 400})
    assert "maximum of 256" in too_long["message"] and too_long["param"] == "input"
    assert error({"input": "a", "dimensions": 16})["param"] == "dimensions"
    assert error({"input": "a", "encoding_format": "int8"})["param"] == "encoding_format"
    assert error({"input": "a", "truncate_prompt_tokens": 999})["param"] == "truncate_prompt_tokens"
    assert error({"input": "a", "temperature": 1})["code"] == "unknown_parameter"
    truncated = httpx.post(f"{both_url}/v1/embeddings", json={"input": "word " * 400, "truncate_prompt_tokens": -1}).json()
    assert truncated["usage"]["prompt_tokens"] == 256
    # the generation model beside it is unaffected: it still generates and holds no leaked KV slot
    out = httpx.post(f"{both_url}/generate", json={"text": "hello", "sampling_params": {"max_new_tokens": 4, "temperature": 0}}).json()
    assert out["meta_info"]["completion_tokens"] == 4
    stats = httpx.get(f"{both_url}/server_info").json()["stats"]
    assert stats["num_running"] == 0 and stats["pool_free"] + stats["evictable_tokens_in_tree"] == stats["pool_size"]


def test_embedding_request_to_a_generation_only_server(llama_path):
    with sglite.Engine(str(llama_path), max_total_tokens=256) as engine, serve_in_thread(engine) as url:
        response = httpx.post(f"{url}/v1/embeddings", json={"input": "hello"})
        assert response.status_code == 400
        assert "generation model and no embedding model is loaded" in response.json()["error"]["message"]
        assert httpx.post(f"{url}/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}}).status_code == 200


def test_generation_request_to_an_embedding_only_server(minilm_path, reference):
    engine = sglite.Engine(minilm_path)
    with serve_in_thread(engine) as url:
        for path, body in (
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
            ("/v1/completions", {"prompt": "hi"}),
            ("/generate", {"text": "hi"}),
        ):
            response = httpx.post(f"{url}{path}", json=body)
            assert response.status_code == 400, path
            assert "is an embedding model" in response.json()["error"]["message"]
        assert httpx.get(f"{url}/get_model_info").json()["is_generation"] is False
        out = httpx.post(f"{url}/v1/embeddings", json={"input": SENTENCES}).json()
        np.testing.assert_allclose([d["embedding"] for d in out["data"]], reference, atol=1e-6)


@pytest.mark.slow
def test_serve_an_embedding_folder_with_no_flag(minilm_path, reference):
    """The issue's first try: ``python -m sglite serve --model <all-MiniLM-L6-v2 folder>`` serves embeddings."""
    with serve_subprocess(["--model", minilm_path]) as url:
        out = httpx.post(f"{url}/v1/embeddings", json={"input": SENTENCES}).json()
        np.testing.assert_allclose([d["embedding"] for d in out["data"]], reference, atol=1e-6)
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}).status_code == 400
