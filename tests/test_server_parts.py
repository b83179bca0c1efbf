"""The server's parts without a running engine: rate limiter, flags, config, request models, errors, logprob text."""

from __future__ import annotations

import argparse
import math

import pytest
from pydantic import ValidationError
from transformers import AutoTokenizer

from sglite.runtime.config import EngineConfig
from sglite.runtime.server.cli import build_parser, parse_rate_limit
from sglite.runtime.server.config import ServerConfig
from sglite.runtime.server.errors import validation_error_to_api_error
from sglite.runtime.server.flags import add_dataclass_flags, dataclass_values, field_docs
from sglite.runtime.logprob_text import FLOOR_LOGPROB, TokenStrings
from sglite.runtime.server.logprobs import completion_logprobs
from sglite.runtime.server.metrics import ServerMetrics
from sglite.runtime.server.native_api import json_safe
from sglite.runtime.server.protocol import JSON_OBJECT_SCHEMA, ChatCompletionRequest, CompletionRequest
from sglite.runtime.server.rate_limit import RateLimiter, retry_after_header


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_allows_a_burst_then_refills_gradually():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=3, clock=clock)
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.acquire("a")
    assert wait == pytest.approx(20.0)  # one token per 20 s at 3/min
    assert limiter.acquire("b") == 0.0, "keys have separate buckets"
    clock.now += 20.0
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") > 0
    assert retry_after_header(0.2) == {"Retry-After": "1"}


def test_rate_limiter_forgets_idle_clients_but_not_a_drained_bucket():
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=1, clock=clock)
    for i in range(10_001):
        limiter.acquire(f"client-{i}")
    assert limiter.tracked_keys == 10_001
    clock.now += 119
    assert limiter.acquire("busy") == 0.0  # drained just now: not full when the others are forgotten
    clock.now += 1
    limiter.acquire("one-more")
    assert limiter.tracked_keys == 2  # "busy" and "one-more"
    assert limiter.acquire("busy") == pytest.approx(59.0)  # its bucket survived, still empty


@pytest.mark.parametrize("text, expected", [("60", 60), ("60/min", 60), (" 5 / m ", 5)])
def test_rate_limit_flag_parses_requests_per_minute(text, expected):
    assert parse_rate_limit(text) == expected


@pytest.mark.parametrize("text", ["", "fast", "5/s", "-1", "1.5"])
def test_rate_limit_flag_rejects_other_forms(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_rate_limit(text)


def test_flags_are_generated_from_both_configs():
    parser = build_parser()
    args = parser.parse_args(
        ["--model", "m", "--port", "8000", "--api-key", "k", "--rate-limit", "30/min", "--no-jump-forward", "--max-total-tokens", "4096"]
    )
    assert ServerConfig(**dataclass_values(args, ServerConfig)) == ServerConfig(port=8000, api_key="k", rate_limit=30)
    assert dataclass_values(args, EngineConfig) == {"jump_forward": False, "max_total_tokens": 4096}
    help_text = parser.format_help()
    for doc in field_docs(ServerConfig).values():
        assert doc.split()[0] in help_text
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--port", "not-a-number"])


def test_field_docs_are_read_from_the_source():
    docs = field_docs(ServerConfig)
    assert set(docs) == {f for f in ServerConfig.__dataclass_fields__}
    assert "Bearer" in docs["api_key"]


def test_unset_flags_keep_dataclass_defaults():
    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, ServerConfig)
    assert dataclass_values(parser.parse_args([]), ServerConfig) == {}


@pytest.mark.parametrize(
    "bad", [dict(port=70000), dict(api_key=" "), dict(rate_limit=0), dict(max_body_bytes=10), dict(log_level="loud")]
)
def test_server_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        ServerConfig(**bad)


def test_completion_prompt_forms():
    def prompts(prompt):
        return CompletionRequest.model_validate({"prompt": prompt}).prompts()

    assert prompts("a") == ["a"]
    assert prompts(["a", "b"]) == ["a", "b"]
    assert prompts([1, 2]) == [[1, 2]]
    assert prompts([[1], [2, 3]]) == [[1], [2, 3]]


def test_chat_request_maps_to_engine_sampling_params():
    req = ChatCompletionRequest.model_validate(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 9,
            "max_completion_tokens": 4,
            "top_p": 0.0,
            "seed": -1,
            "stop": "END",
            "min_tokens": 2,
            "response_format": {"type": "json_object"},
            "user": "ignored",
        }
    )
    params = req.sampling_params(req.max_new_tokens())
    assert params == {"max_new_tokens": 4, "top_k": 1, "seed": 2**63 - 1, "stop": ["END"], "min_new_tokens": 2}
    assert req.constraint() == {"json_schema": JSON_OBJECT_SCHEMA}


@pytest.mark.parametrize("field", [{"functions": [{"name": "f"}]}, {"logit_bias": {"5": 1.0}}, {"bogus": 1}])
def test_unsupported_and_unknown_fields_are_rejected_by_name(field):
    with pytest.raises(ValidationError) as err:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], **field})
    error = validation_error_to_api_error(err.value.errors())
    assert error.status == 400 and error.param == next(iter(field))


def test_union_errors_name_the_informative_member():
    with pytest.raises(ValidationError) as err:
        CompletionRequest.model_validate_json('{"prompt": [-1]}')
    error = validation_error_to_api_error(err.value.errors())
    assert error.param == "prompt.0" and "greater than or equal to 0" in error.message


def test_json_safe_makes_logprobs_json_legal():
    assert json_safe({"a": [(-math.inf, 3, None)], "b": math.nan}) == {"a": [[FLOOR_LOGPROB, 3, None]], "b": None}


@pytest.fixture(scope="module", params=["llama_path", "sentencepiece_path"])
def tokenizer(request):
    return AutoTokenizer.from_pretrained(request.getfixturevalue(request.param))


def test_token_bytes_rebuild_multibyte_text(tokenizer):
    text = "héllo wörld 你好 ▁x"
    ids = tokenizer.encode(text, add_special_tokens=False)
    strings = TokenStrings(tokenizer)
    rebuilt = bytes(b for i in ids for b in strings.bytes(i)).decode("utf-8")
    # SentencePiece spells the space it prepends to the text ("▁héllo"); decode drops it again.
    assert rebuilt.removeprefix(" ") == tokenizer.decode(ids)


def test_legacy_logprob_offsets_follow_token_text(tokenizer):
    ids = tokenizer.encode("import os", add_special_tokens=False)
    strings = TokenStrings(tokenizer)
    entries = [(None, ids[0], None)] + [(-0.5, i, None) for i in ids[1:]]
    logprobs, end = completion_logprobs(strings, entries, None, text_offset=0)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.top_logprobs[1] == {strings.text(ids[1]): -0.5}
    assert end == len("".join(logprobs.tokens))


class StubEngine:
    def get_stats(self) -> dict:
        return {"num_running": 2, "num_waiting": 1, "pool_size": 100, "pool_free": 25, "prompt_tokens_total": 10, "cache_hit_tokens_total": 4}


def test_each_app_has_its_own_metrics_registry():
    first, second = ServerMetrics(StubEngine(), "a"), ServerMetrics(StubEngine(), "b")
    first.ttft.observe(0.1)
    body = first.render()[0].decode()
    assert 'sglite_kv_pool_usage_ratio{model="a"} 0.75' in body
    assert 'sglite_radix_cache_hit_rate{model="a"} 0.4' in body
    assert "sglite_time_to_first_token_seconds_count 1.0" in body
    assert "sglite_time_to_first_token_seconds_count 0.0" in second.render()[0].decode()


def test_a_streamed_event_stays_one_line_for_clients_that_split_on_unicode_line_breaks():
    import json

    from httpx._decoders import LineDecoder

    from sglite.runtime.server.streaming import sse

    content = "a\x85b\u2028c\u2029d\x1ce\nf"  # what a token may decode to; pydantic leaves the first three raw
    event = sse(ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": content}]}).model_dump_json())
    decoder = LineDecoder()  # httpx's aiter_lines: str.splitlines, which ends lines at \x85, \u2028, \u2029 too
    lines = [line for line in decoder.decode(event) + decoder.flush() if line]
    assert len(lines) == 1 and lines[0].startswith("data: ")
    assert json.loads(lines[0][len("data: "):])["messages"][0]["content"] == content
