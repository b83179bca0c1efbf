"""LangChain's ``ChatOpenAI`` against the server on loopback: a chat round trip and ``with_structured_output``
by both of its methods (``json_schema`` -> response_format, ``function_calling`` -> a named tool call)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field

import sglite
from sglite.runtime.server.testing import serve_in_thread

langchain_openai = pytest.importorskip("langchain_openai", reason="needs the compat extra (langchain-openai)")


class City(BaseModel):
    name: str = Field(max_length=12)
    population: int = Field(ge=0, le=10**8)
    coastal: bool


@pytest.fixture(scope="module")
def chat_model(llama_path):
    with sglite.Engine(str(llama_path), max_total_tokens=8192) as engine, serve_in_thread(engine) as url:
        yield langchain_openai.ChatOpenAI(
            base_url=f"{url}/v1", api_key="unused", model="tiny", max_tokens=80, temperature=0, max_retries=0
        )


def test_chat_round_trip(chat_model):
    reply = chat_model.invoke("Name a city.")
    assert isinstance(reply.content, str) and reply.content
    assert reply.usage_metadata["output_tokens"] > 0


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output_returns_a_valid_model(chat_model, method):
    cities = []
    for seed in range(3):
        sampled = chat_model.model_copy(update={"seed": seed, "temperature": 1.0})
        city = sampled.with_structured_output(City, method=method).invoke("Describe a city as JSON.")
        assert isinstance(city, City)  # pydantic validated it: types and bounds hold
        cities.append(city)
    assert len({c.model_dump_json() for c in cities}) > 1  # sampled, not one cached answer
